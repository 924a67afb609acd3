//! End-to-end behaviour of simulated servers over real HTTP on loopback.

// Helpers outside `#[test]` functions are test code too; a failed call should fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sluice_sim::fleet::{self, FleetConfig};
use sluice_sim::load::{self, LoadConfig};
use sluice_sim::metrics::{EngineFlavor, parse_strict};
use sluice_sim::preset::Preset;
use sluice_sim::server::{self, Faults, Handle, ServerConfig};
use sluice_sim::workload::Workload;

type C = Client<HttpConnector, Full<Bytes>>;

fn client() -> C {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn call(
    c: &C,
    method: &str,
    url: String,
    body: Option<Value>,
) -> (u16, http::HeaderMap, String) {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

async fn tiny(time_scale: f64) -> Handle {
    let mut c = ServerConfig::new("sim-t", Preset::Tiny.config());
    c.time_scale = time_scale;
    server::spawn(c).await.unwrap()
}

#[tokio::test]
async fn serves_the_openai_api_like_vllm() {
    let h = tiny(10.0).await;
    let c = client();
    let base = h.base_url();

    let (s, _, _) = call(&c, "GET", format!("{base}/health"), None).await;
    assert_eq!(s, 200);
    let (s, _, body) = call(&c, "GET", format!("{base}/v1/models"), None).await;
    assert_eq!(s, 200);
    let ids: Vec<String> = serde_json::from_str::<Value>(&body).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["tiny", "lora-0", "lora-1"]);

    // Non-streaming completion: usage and the answering server.
    let (s, headers, body) = call(
        &c,
        "POST",
        format!("{base}/v1/completions"),
        Some(json!({"model": "tiny", "prompt": "x".repeat(100), "max_tokens": 5, "ignore_eos": true})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(headers["x-sim-server"], "sim-t");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 25);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap().len(), 20);

    // Streaming chat with the usage chunk and [DONE].
    let (s, headers, body) = call(
        &c,
        "POST",
        format!("{base}/v1/chat/completions"),
        Some(json!({"model": "lora-1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                    "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 6, "{body}"); // 4 tokens, usage, [DONE]
    assert_eq!(events[5], "data: [DONE]");
    let last_token: Value =
        serde_json::from_str(events[3].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last_token["choices"][0]["finish_reason"], "length");
    assert_eq!(last_token["object"], "chat.completion.chunk");
    let usage: Value = serde_json::from_str(events[4].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert_eq!(usage["choices"], json!([]));

    // Bad requests get vLLM's 400 body; unknown models a 404.
    let (s, _, body) = call(
        &c,
        "POST",
        format!("{base}/v1/completions"),
        Some(json!({"model": "tiny"})),
    )
    .await;
    assert_eq!(s, 400);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "BadRequestError");
    assert!(v["error"]["message"].as_str().unwrap().contains("prompt"));
    let (s, _, body) = call(
        &c,
        "POST",
        format!("{base}/v1/completions"),
        Some(json!({"model": "tiny", "prompt": "x".repeat(4000), "max_tokens": 100})),
    )
    .await;
    assert_eq!(s, 400);
    assert!(body.contains("maximum context length"), "{body}");
    let (s, _, _) = call(
        &c,
        "POST",
        format!("{base}/v1/completions"),
        Some(json!({"model": "gpt-9", "prompt": "x"})),
    )
    .await;
    assert_eq!(s, 404);

    // Metrics are strictly parseable and count what happened.
    let (s, headers, text) = call(&c, "GET", format!("{base}/metrics"), None).await;
    assert_eq!(s, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let m = parse_strict(&text).unwrap();
    assert_eq!(m["vllm:generation_tokens_total"][0].1, 9.0);
    assert_eq!(m["vllm:num_requests_running"][0].1, 0.0);
    assert!(
        m["vllm:cache_config_info"][0]
            .0
            .contains("num_gpu_blocks=\"64\"")
    );
    assert!(m["vllm:lora_requests_info"][0].0.contains("max_lora=\"1\""));
    h.shutdown().await;
}

#[tokio::test]
async fn streams_tokens_as_they_are_generated() {
    // Real time on an H100 preset: ~7 ms per token, so 60 tokens take ~0.45 s and the first
    // chunk must arrive long before the last.
    let h = server::spawn(ServerConfig::new("sim-s", Preset::H100Llama8b.config()))
        .await
        .unwrap();
    let w = Workload::from_yaml(
        "name: one\narrival: {type: closed, concurrency: 1}\nduration_s: 0.01\nclasses:\n  - name: c\n    prompt: {dist: fixed, value: 64}\n    output: {dist: fixed, value: 60}\n",
        "inline",
    )
    .unwrap();
    let s = load::run(LoadConfig::new(vec![h.base_url()], w))
        .await
        .unwrap();
    assert_eq!(s.ok, 1, "{s:?}");
    assert!(s.ttft_ms.p50 < s.e2e_ms.p50 / 5.0, "{s:?}");
    assert!(s.tpot_ms.p50 > 5.0 && s.tpot_ms.p50 < 12.0, "{s:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn queue_depth_shows_in_metrics_and_in_ttft() {
    let mut cfg = ServerConfig::new("sim-q", Preset::Tiny.config());
    cfg.engine.max_num_seqs = 2;
    cfg.time_scale = 5.0;
    let h = server::spawn(cfg).await.unwrap();
    let w = Workload::from_yaml(
        "name: burst\narrival: {type: constant, rate: 10000}\nduration_s: 0.002\nclasses:\n  - name: c\n    prompt: {dist: fixed, value: 32}\n    output: {dist: fixed, value: 20}\n",
        "inline",
    )
    .unwrap();
    let base = h.base_url();
    let run = tokio::spawn(async move {
        let mut lc = LoadConfig::new(vec![base], w);
        lc.time_scale = 5.0;
        lc.default_model = "tiny".into();
        load::run(lc).await.unwrap()
    });
    // Poll the gauge until the burst is queued (bounded by a deadline, not a fixed sleep).
    let c = client();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut max_waiting = 0.0f64;
    while std::time::Instant::now() < deadline && !run.is_finished() {
        let (_, _, text) = call(&c, "GET", format!("{}/metrics", h.base_url()), None).await;
        let m = parse_strict(&text).unwrap();
        max_waiting = max_waiting.max(m["vllm:num_requests_waiting"][0].1);
        tokio::task::yield_now().await;
    }
    let s = run.await.unwrap();
    assert_eq!(s.ok, 19, "{s:?}");
    assert!(max_waiting >= 5.0, "{max_waiting}");
    // The last of 19 requests on 2 seats waits for ~9 rounds of 20 tokens.
    let round_ms = s.tpot_ms.p50 * 20.0;
    assert!(s.ttft_ms.p99 > 5.0 * round_ms, "{s:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn faults_can_be_injected_at_run_time() {
    let h = tiny(10.0).await;
    let c = client();
    let base = h.base_url();
    let gen_body = json!({"model": "tiny", "prompt": "hello world", "max_tokens": 8, "ignore_eos": true, "stream": true});

    // 5xx share through the admin endpoint.
    let (s, _, _) = call(
        &c,
        "PUT",
        format!("{base}/admin/faults"),
        Some(json!({"error_rate": 1.0, "error_status": 503})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, _) = call(
        &c,
        "POST",
        format!("{base}/v1/completions"),
        Some(gen_body.clone()),
    )
    .await;
    assert_eq!(s, 503);
    let (s, _, body) = call(
        &c,
        "PUT",
        format!("{base}/admin/faults"),
        Some(json!({"error_rate": 2.0})),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        body.contains("error_rate must be between 0 and 1"),
        "{body}"
    );

    // Dropped connections mid-stream: the body breaks before [DONE].
    h.admin
        .set_faults(Faults {
            drop_rate: 1.0,
            ..Faults::default()
        })
        .unwrap();
    let req = http::Request::post(format!("{base}/v1/completions"))
        .body(Full::new(Bytes::from(gen_body.to_string())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await;
    assert!(collected.is_err(), "the stream should break");

    // Hangs hold the request, then time out with a 504.
    h.admin
        .set_faults(Faults {
            hang_rate: 1.0,
            hang_ms: 150,
            ..Faults::default()
        })
        .unwrap();
    let t = std::time::Instant::now();
    let (s, _, _) = call(
        &c,
        "POST",
        format!("{base}/v1/completions"),
        Some(gen_body.clone()),
    )
    .await;
    assert_eq!(s, 504);
    assert!(t.elapsed() >= Duration::from_millis(150));

    // Garbage and slow metrics.
    h.admin
        .set_faults(Faults {
            metrics_garbage: true,
            ..Faults::default()
        })
        .unwrap();
    let (_, _, text) = call(&c, "GET", format!("{base}/metrics"), None).await;
    assert!(parse_strict(&text).is_err());
    h.admin
        .set_faults(Faults {
            metrics_delay_ms: 200,
            ..Faults::default()
        })
        .unwrap();
    let t = std::time::Instant::now();
    let (s, _, _) = call(&c, "GET", format!("{base}/metrics"), None).await;
    assert_eq!(s, 200);
    assert!(t.elapsed() >= Duration::from_millis(200));

    // A server that dies and comes back on the same port.
    h.admin.set_faults(Faults::default()).unwrap();
    let (s, _, _) = call(&c, "POST", format!("{base}/admin/down?ms=300"), None).await;
    assert_eq!(s, 200);
    let fresh = client(); // no pooled connections
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut saw_down = false;
    let mut back = false;
    while std::time::Instant::now() < deadline {
        let req = http::Request::get(format!("{base}/health"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        match fresh.request(req).await {
            Err(_) => saw_down = true,
            Ok(r) if saw_down && r.status() == 200 => {
                back = true;
                break;
            }
            Ok(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_down && back, "down {saw_down} back {back}");
    h.shutdown().await;
}

#[tokio::test]
async fn other_engines_expose_their_metric_names() {
    for (flavor, waiting) in [
        (EngineFlavor::Sglang, "sglang:num_queue_reqs"),
        (EngineFlavor::TrtllmServe, "trtllm_num_requests_waiting"),
    ] {
        let mut cfg = ServerConfig::new("sim-e", Preset::Tiny.config());
        cfg.flavor = flavor;
        let h = server::spawn(cfg).await.unwrap();
        let (_, _, text) = call(&client(), "GET", format!("{}/metrics", h.base_url()), None).await;
        let m = parse_strict(&text).unwrap();
        assert!(m.contains_key(waiting), "{text}");
        assert!(!m.contains_key("vllm:num_requests_waiting"));
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_at_a_time_scale_reports_simulated_latencies_and_spreads_load() {
    // The same load at 1× and 5×: simulated TPOT agrees, wall time shrinks.
    let run = |scale: f64| async move {
        let mut fc = FleetConfig::new(4, &[Preset::H100Llama8b, Preset::A100Llama8b]);
        fc.time_scale = scale;
        let hs = fleet::spawn_with(&fc).await.unwrap();
        let w = Workload::from_yaml(
            "name: f\nseed: 1\narrival: {type: constant, rate: 40}\nduration_s: 1\nclasses:\n  - name: c\n    prompt: {dist: fixed, value: 200}\n    output: {dist: fixed, value: 20}\n    slo: {ttft_ms: 1000, tpot_ms: 100}\n",
            "inline",
        )
        .unwrap();
        let mut lc = LoadConfig::new(hs.iter().map(Handle::base_url).collect(), w);
        lc.time_scale = scale;
        let s = load::run(lc).await.unwrap();
        for h in hs {
            h.shutdown().await;
        }
        s
    };
    let real = run(1.0).await;
    let fast = run(5.0).await;
    for s in [&real, &fast] {
        assert_eq!(s.ok, 39, "{s:?}");
        assert_eq!(s.per_server.len(), 4);
        assert!(s.per_server.values().all(|n| *n >= 9));
        // Generous SLOs; wall-clock jitter (multiplied by the time scale) may cost a request.
        assert!(s.slo_attainment >= 0.9, "{s:?}");
    }
    assert!(
        fast.wall_s < real.wall_s / 2.5,
        "{} vs {}",
        fast.wall_s,
        real.wall_s
    );
    // H100 and A100 servers decode at ~7.5 and ~14 ms per token.
    assert!(
        real.tpot_ms.p50 > 6.0 && real.tpot_ms.p90 < 20.0,
        "{:?}",
        real.tpot_ms
    );
    assert!(
        (fast.tpot_ms.mean - real.tpot_ms.mean).abs() < real.tpot_ms.mean * 0.5,
        "{:?} {:?}",
        fast.tpot_ms,
        real.tpot_ms
    );
}

#[tokio::test]
async fn goodput_counts_only_requests_within_their_slos() {
    let h = tiny(10.0).await;
    let w = Workload::from_yaml(
        r#"
name: slo
seed: 2
arrival: {type: closed, concurrency: 2}
duration_s: 1
model: tiny
classes:
  - name: easy
    prompt: {dist: fixed, value: 16}
    output: {dist: fixed, value: 4}
    slo: {ttft_ms: 10000, tpot_ms: 10000}
    objective: premium
    workload: {workload_id: easy, criticality: 5}
  - name: impossible
    prompt: {dist: fixed, value: 16}
    output: {dist: fixed, value: 4}
    slo: {ttft_ms: 0.001}
"#,
        "inline",
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("sluice-sim-test-{}.jsonl", std::process::id()));
    let mut lc = LoadConfig::new(vec![h.base_url()], w);
    lc.time_scale = 10.0;
    lc.output = Some(dir.clone());
    let s = load::run(lc).await.unwrap();
    assert!(s.ok > 10);
    assert_eq!(s.per_class["easy"].slo_attainment, 1.0);
    assert_eq!(s.per_class["impossible"].slo_attainment, 0.0);
    let share_easy = s.per_class["easy"].requests as f64 / s.requests as f64;
    assert!((s.slo_attainment - share_easy).abs() < 1e-9);
    assert!(s.goodput_rps < s.throughput_rps);
    let lines = std::fs::read_to_string(&dir).unwrap();
    assert_eq!(lines.lines().count() as u64, s.requests);
    let first: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(first["server"], "sim-t");
    assert!(first["ttft_ms"].as_f64().unwrap() > 0.0);
    let _ = std::fs::remove_file(dir);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_compares_what_clients_saw_with_the_engine_model_replayed() {
    let mut fc = FleetConfig::new(2, &[Preset::H100Llama8b]);
    fc.time_scale = 2.0;
    let bench = sluice_sim::bench::BenchConfig {
        rate: 40.0,
        duration_s: 1.0,
        prompt_tokens: 128,
        output_tokens: 8,
        stream: true,
    };
    let r = sluice_sim::bench::run(&fc, &bench).await.unwrap();
    let s = &r.summary;
    assert_eq!(s.ok, s.requests, "{}", r.render());
    assert_eq!(s.per_server.len(), 2);
    // Every answered request was replayed on the server that answered it.
    assert_eq!(r.model_ttft_ms.n as u64, s.ok);
    assert_eq!(r.model_tpot_ms.n as u64, s.ok);
    // A light load on an H100: the model decodes at ~7 ms per token and the clients, at twice
    // real time on a (possibly busy) test machine, see about the same.
    assert!(
        r.model_tpot_ms.p50 > 5.0 && r.model_tpot_ms.p50 < 10.0,
        "{}",
        r.render()
    );
    assert!(
        (s.tpot_ms.p50 - r.model_tpot_ms.p50).abs() < 5.0,
        "{}",
        r.render()
    );
    assert!(r.render().contains("kept up: "), "{}", r.render());
}
