//! The controller binary's HTTP endpoints (file mode, through `Args::run_until`): readiness
//! follows the initial load, and `/metrics` reports published versions, pickers in sync,
//! Acks, propagation latency and rejected configs as a picker subscribes and the manifests
//! change.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../sluice-picker/src/config_client.rs"]
#[allow(dead_code)]
mod config_client;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use config_client::{Backoff, ClientStatus, ConfigClientOptions};
use sluice_controller::hub::Hub;
use sluice_controller::metrics::{ControllerMetrics, serve_http_on};
use sluice_controller::runtime::SharedIndex;
use sluice_core::PoolRef;
use sluice_testkit::process::{free_ports, http_get};
use tokio::sync::watch;

const POOL: &str = r#"
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool, namespace: ns}
spec:
  selector: {matchLabels: {app: vllm}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: epp, port: {number: 9002}}
"#;

fn pod(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: ns, labels: {{app: vllm}}}}\n\
         status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    )
}

fn epc(plugin: &str) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: EndpointPickerConfig\n\
         metadata: {{name: cfg, namespace: ns}}\nspec:\n  poolRef: {{name: pool}}\n  \
         plugins: [{{type: {plugin}}}, {{type: max-score-picker}}]\n"
    )
}

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir =
        std::env::temp_dir().join(format!("sluice-ctrl-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, file: &str, docs: &[&str]) {
    // Write then rename, as editors and GitOps syncs do, so the poller never reads half a file.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, docs.join("\n---\n")).unwrap();
    std::fs::rename(tmp, dir.join(file)).unwrap();
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || http_get(addr, &path))
        .await
        .unwrap()
        .unwrap()
}

/// The value of the sample whose line starts with `series ` (exact series match).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn eventually_metric(addr: SocketAddr, series: &str, want: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, text) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        if sample(&text, series) == Some(want) {
            return text;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{series} never became {want}; last: {:?}\n{text}",
                sample(&text, series)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_publishes_acks_and_rejections() {
    let dir = temp_dir("metrics");
    let p1 = pod("p1", "10.0.0.1");
    let p2 = pod("p2", "10.0.0.2");
    write(&dir, "fleet.yaml", &[POOL, &p1, &p2]);
    write(&dir, "config.yaml", &[&epc("queue-scorer")]);
    let ports = free_ports(2).unwrap();
    let grpc: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
    let http: SocketAddr = ([127, 0, 0, 1], ports[1]).into();
    let args = sluice_controller::cli::Args::try_parse_from([
        "sluice-controller",
        "--manifests",
        dir.to_str().unwrap(),
        "--grpc-addr",
        &grpc.to_string(),
        "--metrics-addr",
        &http.to_string(),
        "--poll-interval",
        "20ms",
    ])
    .unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let controller = tokio::spawn(args.run_until(stop_rx));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Ok((200, body))) =
            tokio::task::spawn_blocking(move || http_get(http, "/readyz")).await
        {
            assert_eq!(body, "ready\n");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(http, "/healthz").await.0, 200);
    let series = |name: &str| format!("sluice_controller_{name}{{namespace=\"ns\",pool=\"pool\"}}");
    eventually_metric(http, &series("pool_config_version"), 1.0).await;

    // A picker subscribes and acknowledges.
    let pool = PoolRef {
        namespace: "ns".into(),
        name: "pool".into(),
    };
    let mut opts = ConfigClientOptions::new(format!("http://{grpc}"), pool, "picker-a");
    opts.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
    };
    let (_picker_stop, picker_stop_rx) = watch::channel(false);
    let (status_tx, mut status) = watch::channel(ClientStatus::default());
    tokio::spawn(config_client::run_with_status(
        opts,
        |_| Ok(()),
        picker_stop_rx,
        status_tx,
    ));
    tokio::time::timeout(
        Duration::from_secs(5),
        status.wait_for(|s| s.applied_version == 1),
    )
    .await
    .unwrap()
    .unwrap();
    eventually_metric(http, &series("pickers"), 1.0).await;
    eventually_metric(http, &series("pickers_in_sync"), 1.0).await;
    let text = eventually_metric(
        http,
        "sluice_controller_picker_acks_total{result=\"ack\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(&text, "sluice_controller_config_propagation_seconds_count"),
        Some(0.0),
        "a picker joining after the publish measures its connect, not propagation"
    );

    // A pod goes away: version 2 propagates to the subscribed picker, and is timed.
    write(&dir, "fleet.yaml", &[POOL, &p1]);
    eventually_metric(http, &series("pool_config_version"), 2.0).await;
    let text = eventually_metric(
        http,
        "sluice_controller_config_propagation_seconds_count",
        1.0,
    )
    .await;
    let seconds = sample(&text, "sluice_controller_config_propagation_seconds_sum").unwrap();
    assert!(
        seconds > 0.0 && seconds < 1.0,
        "propagation on loopback is well under a second: {seconds}"
    );
    assert_eq!(sample(&text, "sluice_controller_index_pods"), Some(1.0));

    // A config the scheduler refuses: counted, visible as invalid, version unchanged.
    write(&dir, "config.yaml", &[&epc("no-such-scorer")]);
    let text = eventually_metric(http, "sluice_controller_config_rejections_total", 1.0).await;
    assert_eq!(
        sample(&text, "sluice_controller_configs_invalid"),
        Some(1.0)
    );
    assert_eq!(sample(&text, &series("pool_config_version")), Some(2.0));
    assert_eq!(sample(&text, "sluice_controller_ready"), Some(1.0));

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), controller)
        .await
        .expect("the controller stops on request")
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn readyz_fails_until_the_initial_sync_is_done() {
    let hub = Hub::new();
    let index = SharedIndex::new(sluice_controller::default_validator());
    let metrics = Arc::new(ControllerMetrics::new(hub, index.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stop_rx) = watch::channel(false);
    tokio::spawn(serve_http_on(listener, metrics, stop_rx));

    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("initial list"), "{body}");
    assert_eq!(get(addr, "/healthz").await.0, 200, "live while not ready");
    assert_eq!(
        sample(&get(addr, "/metrics").await.1, "sluice_controller_ready"),
        Some(0.0)
    );
    index.set_synced();
    assert_eq!(get(addr, "/readyz").await.0, 200);
}
