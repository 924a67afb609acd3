//! Config propagation: a change published by the controller until every subscribed picker
//! has applied it and its Ack is recorded, over real gRPC on loopback, for 1/10/50 pickers
//! and pools of 10/1,000 pods; and the controller's memory with 10,000 pods in the index.
//!
//! `cargo bench -p sluice-controller --bench propagation` (criterion timings, plus p50/p99
//! lines printed from the same samples). Memory is resident-set growth, Linux only.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

#[path = "../../sluice-picker/src/config_client.rs"]
#[allow(dead_code, unused_imports)]
mod config_client;

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_controller::grpc::Keepalive;
use sluice_controller::hub::Hub;
use sluice_core::snapshot::AppProtocol;
use sluice_core::{Endpoint, EndpointPickerConfig, PoolRef, PoolSnapshot};
use tokio::sync::watch;

fn pool() -> PoolRef {
    PoolRef {
        namespace: "ns".into(),
        name: "pool".into(),
    }
}

fn snapshot(pods: usize, generation: u16) -> PoolSnapshot {
    let eps = (0..pods)
        .map(|i| {
            let mut e = Endpoint::from_address(
                "ns",
                ([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8000).into(),
            );
            e.labels.insert("app".into(), "vllm".into());
            e.labels.insert("generation".into(), generation.to_string());
            e
        })
        .collect();
    PoolSnapshot::new(
        pool(),
        0,
        AppProtocol::Http,
        eps,
        vec![],
        vec![],
        EndpointPickerConfig::default(),
    )
}

struct Setup {
    hub: Hub,
    _stop: watch::Sender<bool>,
    pickers: usize,
}

async fn setup(pickers: usize, pods: usize) -> Setup {
    let hub = Hub::new();
    hub.publish(snapshot(pods, 0));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    tokio::spawn(sluice_controller::runtime::serve_grpc_on(
        listener,
        hub.clone(),
        "bench".into(),
        Keepalive::default(),
        None,
        rx.clone(),
    ));
    for i in 0..pickers {
        let opts = config_client::ConfigClientOptions::new(
            format!("http://{addr}"),
            pool(),
            format!("picker-{i}"),
        );
        tokio::spawn(config_client::run(opts, |_s| Ok(()), rx.clone()));
    }
    let s = Setup {
        hub,
        _stop: stop,
        pickers,
    };
    s.hub
        .wait_until(|h| h.counts(&pool()).in_sync == pickers)
        .await;
    s
}

async fn propagate(s: &Setup, pods: usize, generation: u16) -> Duration {
    let snap = snapshot(pods, generation);
    let start = Instant::now();
    let version = s.hub.publish(snap);
    let n = s.pickers;
    s.hub
        .wait_until(|h| {
            h.pickers(&pool())
                .values()
                .filter(|p| p.accepted && p.version == version)
                .count()
                == n
        })
        .await;
    start.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("propagation");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for pods in [10usize, 1000] {
        for pickers in [1usize, 10, 50] {
            let s = rt.block_on(setup(pickers, pods));
            let mut generation = 1u16;
            let mut samples = Vec::new();
            group.bench_function(format!("{pickers}_pickers_{pods}_pods"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        generation = generation.wrapping_add(1);
                        let d = rt.block_on(propagate(&s, pods, generation));
                        samples.push(d);
                        total += d;
                    }
                    total
                })
            });
            samples.sort();
            println!(
                "propagation {pickers:>2} pickers {pods:>4} pods: p50 {:>8.2?} p99 {:>8.2?} (n={})",
                percentile(&samples, 0.5),
                percentile(&samples, 0.99),
                samples.len()
            );
        }
    }
    group.finish();
    memory_10k_pods();
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Fills the index with 10,000 pods through the same path file mode and the watchers use,
/// compiles, and reports resident-memory growth.
fn memory_10k_pods() {
    let before = rss_bytes();
    let index =
        sluice_controller::runtime::SharedIndex::new(sluice_controller::default_validator());
    let mut docs = vec![
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {name: pool, namespace: ns}\nspec:\n  selector: {matchLabels: {app: vllm}}\n  targetPorts: [{number: 8000}]\n  endpointPickerRef: {name: epp, port: {number: 9002}}\n".to_owned(),
    ];
    for i in 0..10_000u32 {
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns, labels: {{app: vllm, pod-template-hash: abcdef{i}}}}}\nstatus:\n  podIP: 10.{}.{}.{}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
            i >> 16, (i >> 8) & 255, i & 255
        ));
    }
    let (set, errors) = sluice_controller::files::parse_manifests(&docs.join("---\n"), "bench");
    assert!(errors.is_empty());
    index.update(|i| sluice_controller::files::sync_index(i, &set));
    drop(set);
    drop(docs);
    let hub = Hub::new();
    index.set_synced();
    index.compile_once(&hub);
    let endpoints = hub
        .current(&pool())
        .map(|s| s.endpoints.len())
        .unwrap_or_default();
    let after = rss_bytes();
    if let (Some(b), Some(a)) = (before, after) {
        println!(
            "memory: 10,000 pods indexed + compiled ({endpoints} endpoints): RSS {:.1} MB total, +{:.1} MB",
            a as f64 / 1e6,
            a.saturating_sub(b) as f64 / 1e6
        );
    }
    std::hint::black_box((&index, &hub));
}

criterion_group!(benches, bench);
criterion_main!(benches);
