//! SLO-aware routing end to end: a real Envoy, the picker with the predicted-latency
//! profile and its in-process predictor, and two simulated servers of different hardware
//! over real HTTP. The predictor starts with no model, learns from the streamed responses
//! it sees, and then keeps requests with a tight inter-token SLO off the slow server.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use sluice_core::Endpoint;
use sluice_core::endpoint::HARDWARE_CLASS_LABEL;
use sluice_e2e::{Fleet, Picker, metric_value, request};
use sluice_sim::Preset;
use sluice_testkit::envoy::{Envoy, EnvoyOptions};
use tokio::task::JoinSet;

/// Twice real time: an H100 decode step is then about 4 ms, an L4's about 35 ms.
const TIME_SCALE: f64 = 2.0;
/// Only the H100 meets it; the L4's step alone is twice as long.
const TPOT_SLO_MS: &str = "15";

fn streamed_completion(model: &str, i: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": model,
            "prompt": format!("request {i}: tell me about inter-token latency"),
            "max_tokens": 16,
            "stream": true,
        })
        .to_string(),
    )
}

/// Sends `n` streamed requests with SLO headers, `concurrency` at a time; all must succeed.
async fn send(
    gw: std::net::SocketAddr,
    model: &str,
    from: usize,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let mut next = from;
    let mut running = JoinSet::new();
    while next < from + n || !running.is_empty() {
        while next < from + n && running.len() < concurrency {
            let body = streamed_completion(model, next);
            running.spawn(async move {
                request(
                    gw,
                    "POST",
                    "/v1/completions",
                    &[("x-slo-ttft-ms", "2000"), ("x-slo-tpot-ms", TPOT_SLO_MS)],
                    body,
                )
                .await
            });
            next += 1;
        }
        let r = running
            .join_next()
            .await
            .context("a request in flight")???;
        anyhow::ensure!(r.status == 200, "status {}: {}", r.status, r.text());
        anyhow::ensure!(r.text().contains("data:"), "not streamed: {}", r.text());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slo_routing_learns_to_keep_tight_tpot_requests_off_the_slow_server() -> anyhow::Result<()>
{
    let fast = Fleet::start(1, Preset::H100Llama8b, TIME_SCALE).await?;
    let slow = Fleet::start(1, Preset::L4Llama8b, TIME_SCALE).await?;
    let model = Fleet::model(Preset::H100Llama8b);
    assert_eq!(model, Fleet::model(Preset::L4Llama8b));
    let endpoint = |addr, class: &str| {
        let mut e = Endpoint::from_address("default", addr);
        e.labels.insert(HARDWARE_CLASS_LABEL.into(), class.into());
        e
    };
    let picker = Picker::start_with(
        vec![
            endpoint(fast.servers[0].addr, "h100"),
            endpoint(slow.servers[0].addr, "l4"),
        ],
        false,
        sluice_scheduling::plugins::slo::SLO_CONFIG_YAML,
    )
    .await?;
    let opts = EnvoyOptions::new(picker.bound.grpc);
    let envoy = tokio::task::spawn_blocking(move || Envoy::start(&opts)).await??;
    let gw = envoy.listen;

    // Until the predictor has a model (50 responses, then its next retrain) the composite
    // score routes, and both servers get traffic.
    let started = Instant::now();
    let mut sent = 0;
    loop {
        send(gw, &model, sent, 16, 8).await?;
        sent += 16;
        let text = picker.metrics_text().await?;
        let predicted = metric_value(
            &text,
            "inference_objective_request_predicted_tpot_seconds_count",
        )
        .unwrap_or(0.0);
        if predicted > 0.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no model after {sent} requests:\n{}",
            envoy.log_tail(5)
        );
    }
    let text = picker.metrics_text().await?;
    let measured = metric_value(&text, "inference_objective_request_tpot_seconds_count");
    assert!(
        measured.is_some_and(|n| n >= 50.0),
        "TPOT measured from the stream: {measured:?}"
    );
    assert!(
        slow.servers[0].admin.served() > 0,
        "before the model, the composite score used both servers"
    );

    // With a model, a 15 ms inter-token SLO is valid only on the H100: the L4 is only
    // explored (about 1 % of a valid endpoint's weight).
    let (fast_before, slow_before) = (
        fast.servers[0].admin.served(),
        slow.servers[0].admin.served(),
    );
    send(gw, &model, sent, 60, 4).await?;
    let to_fast = fast.servers[0].admin.served() - fast_before;
    let to_slow = slow.servers[0].admin.served() - slow_before;
    eprintln!(
        "model after {sent} requests ({:?}); then {to_fast} to the H100, {to_slow} to the L4",
        started.elapsed()
    );
    assert_eq!(to_fast + to_slow, 60);
    assert!(
        to_slow <= 4,
        "tight-TPOT requests kept off the L4: {to_fast} to the H100, {to_slow} to the L4"
    );
    Ok(())
}
