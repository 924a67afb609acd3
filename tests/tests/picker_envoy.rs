//! sluice-picker behind a real Envoy, in front of simulated model servers, over real HTTP.

use bytes::Bytes;
use sluice_e2e::{Fleet, Picker, metric_value, request};
use sluice_sim::Preset;
use sluice_testkit::envoy::{
    BodyMode, Envoy, EnvoyOptions, SUBSET_HEADER_LIST, SUBSET_HEADER_STRING,
};

const PRESET: Preset = Preset::H100Llama8b;

fn completion(model: &str, prompt: &str, stream: bool) -> Bytes {
    Bytes::from(
        serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 4, "stream": stream})
            .to_string(),
    )
}

/// Full-duplex mode (upstream's), TLS between Envoy and the picker: routing, streaming,
/// model rewrite, usage, a 1 MB body, client-supplied destination headers, bad JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_duplex_behind_envoy() -> anyhow::Result<()> {
    let fleet = Fleet::start(3, PRESET, 50.0).await?;
    let model = Fleet::model(PRESET);
    let picker = Picker::start(&fleet.addrs(), true, "").await?;
    let mut opts = EnvoyOptions::new(picker.bound.grpc);
    opts.extproc_tls = true;
    let envoy = tokio::task::spawn_blocking(move || Envoy::start(&opts)).await??;
    let gw = envoy.listen;

    // Routing follows the pick: every endpoint served exactly what the picker sent it.
    for i in 0..24 {
        let r = request(
            gw,
            "POST",
            "/v1/completions",
            &[],
            completion(&model, &format!("hello {i}"), false),
        )
        .await?;
        assert_eq!(r.status, 200, "{}\n{}", r.text(), envoy.log_tail(20));
    }
    let text = picker.metrics_text().await?;
    let mut routed_total = 0.0;
    for s in &fleet.servers {
        let picked = text
            .lines()
            .filter(|l| {
                l.starts_with("inference_extension_scheduler_attempts_total{status=\"success\"")
                    && l.contains(&format!("pod_name=\"{}\"", s.addr))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        routed_total += picked;
        assert_eq!(
            s.admin.served() as f64,
            picked,
            "server {} served {} but the picker sent it {picked}",
            s.addr,
            s.admin.served()
        );
    }
    assert_eq!(routed_total, 24.0);
    // Each decision's plugin calls are timed under upstream's plugin-duration labels.
    assert_eq!(
        metric_value(
            &text,
            "inference_extension_plugin_duration_seconds_count{extension_point=\"Picker\",plugin_type=\"max-score-picker\",plugin_name=\"max-score-picker\"}"
        ),
        Some(24.0),
        "{text}"
    );

    // Streaming: server-sent events arrive and end with [DONE].
    let r = request(
        gw,
        "POST",
        "/v1/completions",
        &[],
        completion(&model, "stream please", true),
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .contains("text/event-stream")
    );
    let body = r.text();
    assert!(
        body.matches("data: ").count() >= 2 && body.contains("data: [DONE]"),
        "{body}"
    );

    // Model rewrite round trip: the server sees its model, the client its own name.
    let r = request(
        gw,
        "POST",
        "/v1/completions",
        &[("x-gateway-model-name-rewrite", &model)],
        completion("my-alias", "rewrite me", false),
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body)?;
    assert_eq!(v["model"], "my-alias", "{v}");
    let text = picker.metrics_text().await?;
    let usage = metric_value(
        &text,
        &format!(
            "inference_objective_input_tokens_count{{model_name=\"my-alias\",target_model_name=\"{model}\"}}"
        ),
    );
    assert_eq!(
        usage,
        Some(1.0),
        "usage of the rewritten request is parsed:\n{text}"
    );

    // A client-supplied destination header is ignored: the pick still lands on a real server.
    let r = request(
        gw,
        "POST",
        "/v1/completions",
        &[("x-gateway-destination-endpoint", "127.0.0.1:1")],
        completion(&model, "sneaky", false),
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text());

    // A 1 MB body crosses ext_proc chunk boundaries intact: the server counts every token id.
    let ids: Vec<u32> = (0..115_000u32).map(|i| 10_000_000 + i).collect();
    let big = serde_json::json!({"model": model, "prompt": ids, "max_tokens": 1}).to_string();
    assert!(big.len() > 1_000_000);
    let r = request(gw, "POST", "/v1/completions", &[], Bytes::from(big)).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body)?;
    assert_eq!(v["usage"]["prompt_tokens"], 115_000, "{}", v["usage"]);

    // Bad JSON and a missing model: 400 with a reason, from the picker.
    let r = request(
        gw,
        "POST",
        "/v1/completions",
        &[],
        Bytes::from_static(b"not json"),
    )
    .await?;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("not a JSON object"), "{}", r.text());
    let r = request(
        gw,
        "POST",
        "/v1/completions",
        &[],
        Bytes::from_static(br#"{"prompt":"x"}"#),
    )
    .await?;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("model not found"), "{}", r.text());

    // A plain GET without a body is routed too.
    let r = request(gw, "GET", "/v1/models", &[], Bytes::new()).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    Ok(())
}

/// Buffered mode, plaintext; then the picker goes away: fail-closed answers 5xx, fail-open
/// still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_mode_and_picker_failure_modes() -> anyhow::Result<()> {
    let fleet = Fleet::start(2, PRESET, 50.0).await?;
    let model = Fleet::model(PRESET);
    let picker = Picker::start(&fleet.addrs(), false, "").await?;
    let mut opts = EnvoyOptions::new(picker.bound.grpc);
    opts.body_mode = BodyMode::Buffered;
    let envoy = tokio::task::spawn_blocking(move || Envoy::start(&opts)).await??;
    let r = request(envoy.listen, "POST", "/v1/chat/completions", &[("x-gateway-model-name-rewrite", &model)], Bytes::from(
        serde_json::json!({"model": "alias", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).to_string(),
    ))
    .await?;
    assert_eq!(
        r.status,
        200,
        "{}\n{}\n{}",
        r.text(),
        envoy.log_tail(20),
        envoy
            .stats()?
            .lines()
            .filter(|l| l.contains("ext_proc") && !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body)?;
    assert_eq!(v["model"], "alias", "{v}");

    // The picker is down (nothing listens on its port any more).
    let dead = picker.bound.grpc;
    drop(picker);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let closed = {
        let opts = EnvoyOptions::new(dead);
        tokio::task::spawn_blocking(move || Envoy::start(&opts)).await??
    };
    let r = request(
        closed.listen,
        "POST",
        "/v1/completions",
        &[],
        completion(&model, "x", false),
    )
    .await?;
    assert!(
        (500..600).contains(&r.status),
        "fail-closed must answer 5xx, got {} {}",
        r.status,
        r.text()
    );

    // Fail-open needs BUFFERED: Envoy 1.40 answers 500 for a dead processor in
    // FULL_DUPLEX_STREAMED mode even with failure_mode_allow (the body may already be
    // consumed), so a fail-open pool must use buffered bodies.
    let open = {
        let mut opts = EnvoyOptions::new(dead);
        opts.failure_mode_allow = true;
        opts.body_mode = BodyMode::Buffered;
        opts.fail_open_destination = Some(fleet.servers[0].addr);
        tokio::task::spawn_blocking(move || Envoy::start(&opts)).await??
    };
    let r = request(
        open.listen,
        "POST",
        "/v1/completions",
        &[],
        completion(&model, "x", false),
    )
    .await?;
    assert_eq!(
        r.status,
        200,
        "fail-open must still serve: {}\n{}",
        r.text(),
        open.log_tail(20)
    );
    Ok(())
}

/// The subset hint as Envoy delivers it: filter metadata `envoy.lb.subset_hint` set by a
/// filter before ext_proc (here `header_to_metadata`, from test headers) and forwarded through
/// `metadata_options`. Both shapes a data plane may send — the protocol's list of `ip:port`
/// and a comma-separated string — restrict the pick; a subset matching nothing is a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_hint_restricts_picks_behind_envoy() -> anyhow::Result<()> {
    let fleet = Fleet::start(4, PRESET, 50.0).await?;
    let model = Fleet::model(PRESET);
    let picker = Picker::start(&fleet.addrs(), false, "").await?;
    let mut opts = EnvoyOptions::new(picker.bound.grpc);
    opts.subset_hint_headers = true;
    let envoy = tokio::task::spawn_blocking(move || Envoy::start(&opts)).await??;
    let gw = envoy.listen;
    let served = || -> Vec<u64> { fleet.servers.iter().map(|s| s.admin.served()).collect() };

    // Both encodings Envoy may carry: the protocol's list (servers 1 and 3) and a
    // comma-separated string (servers 0 and 2).
    let list = protobuf_string_list(
        &[fleet.servers[1].addr, fleet.servers[3].addr].map(|a| a.to_string()),
    );
    let csv = format!("{}, {}", fleet.servers[0].addr, fleet.servers[2].addr);
    for (form, header, value, inside) in [
        ("list", SUBSET_HEADER_LIST, &list, [1, 3]),
        ("csv", SUBSET_HEADER_STRING, &csv, [0, 2]),
    ] {
        let before = served();
        for i in 0..16 {
            let r = request(
                gw,
                "POST",
                "/v1/completions",
                &[(header, value.as_str())],
                completion(&model, &format!("subset {form} {i}"), false),
            )
            .await?;
            assert_eq!(r.status, 200, "{}\n{}", r.text(), envoy.log_tail(20));
        }
        let delta: Vec<u64> = served().iter().zip(&before).map(|(a, b)| a - b).collect();
        let in_subset: u64 = inside.iter().map(|&i| delta[i]).sum();
        assert_eq!(
            in_subset, 16,
            "{form}: served outside the subset: {delta:?}"
        );
    }

    // A subset naming no endpoint of the pool: 503 with a reason, and nobody is called.
    let before = served();
    let nowhere = protobuf_string_list(&["127.0.0.1:1".to_string()]);
    let r = request(
        gw,
        "POST",
        "/v1/completions",
        &[(SUBSET_HEADER_LIST, &nowhere)],
        completion(&model, "no match", false),
    )
    .await?;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text().contains("failed to find endpoint candidates"),
        "{}",
        r.text()
    );
    assert_eq!(served(), before);

    // Without a hint every endpoint is eligible again (the hint is per request).
    let r = request(
        gw,
        "POST",
        "/v1/completions",
        &[],
        completion(&model, "no hint", false),
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    Ok(())
}

/// Base64 of a serialized `google.protobuf.Value` holding a list of strings: what Envoy's
/// `header_to_metadata` `PROTOBUF_VALUE` rules decode into a metadata value.
fn protobuf_string_list(items: &[String]) -> String {
    use base64::Engine;
    fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
        out.push(tag);
        let mut n = bytes.len();
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(bytes);
    }
    let mut list = Vec::new();
    for s in items {
        // ListValue.values (1) = Value { string_value (3) }.
        let mut v = Vec::new();
        field(&mut v, 0x1a, s.as_bytes());
        field(&mut list, 0x0a, &v);
    }
    // Value.list_value (6).
    let mut value = Vec::new();
    field(&mut value, 0x32, &list);
    base64::engine::general_purpose::STANDARD.encode(value)
}
