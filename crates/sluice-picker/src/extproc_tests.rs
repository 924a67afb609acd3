//! Session tests: the ext_proc state machine driven message by message, without gRPC.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse,
    ProtocolConfiguration, body_mutation::Mutation, processing_request::Request as In,
    processing_response::Response as Out,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use sluice_core::{
    Endpoint, EndpointMetrics, ModelRewriteRule, Objective, PoolRef, PoolSnapshot, RewriteTarget,
};

use super::*;
use crate::metrics::Metrics;
use crate::standalone;

const A: &str = "10.0.0.1:8000";
const B: &str = "10.0.0.2:8000";

fn metrics(queue: u32, kv: f64) -> EndpointMetrics {
    EndpointMetrics {
        waiting_queue_size: queue,
        kv_cache_usage: kv,
        ..Default::default()
    }
}

struct Fixture {
    state: PickerState,
    service: ExtProcService,
}

impl Fixture {
    fn new(objectives: Vec<Objective>, rewrites: Vec<ModelRewriteRule>) -> Self {
        Self::with_options(objectives, rewrites, ServerOptions::default())
    }

    fn with_options(
        objectives: Vec<Objective>,
        rewrites: Vec<ModelRewriteRule>,
        opts: ServerOptions,
    ) -> Self {
        Self::build(objectives, rewrites, opts, Default::default())
    }

    /// A fixture routing with the EndpointPickerConfig in `yaml`.
    fn with_config(objectives: Vec<Objective>, yaml: &str) -> Self {
        let cfg = standalone::config_from_text(yaml).unwrap();
        Self::build(objectives, vec![], ServerOptions::default(), cfg)
    }

    fn build(
        objectives: Vec<Objective>,
        rewrites: Vec<ModelRewriteRule>,
        opts: ServerOptions,
        config: sluice_core::EndpointPickerConfig,
    ) -> Self {
        let state = PickerState::new(Arc::new(Metrics::new()), None, None);
        let eps = [A, B]
            .iter()
            .map(|a| Endpoint::from_address("default", a.parse().unwrap()))
            .collect();
        let snap = PoolSnapshot::new(
            PoolRef {
                namespace: "default".into(),
                name: "pool".into(),
            },
            1,
            Default::default(),
            eps,
            objectives,
            rewrites,
            config,
        );
        state.apply_snapshot(snap).unwrap();
        let service = ExtProcService::new(state.clone(), opts);
        Fixture { state, service }
    }

    /// A busy, B idle.
    fn b_is_best(&self) {
        self.set_metrics(A, metrics(10, 0.9));
        self.set_metrics(B, metrics(0, 0.1));
    }

    fn set_metrics(&self, addr: &str, m: EndpointMetrics) {
        let loaded = self.state.current().unwrap();
        loaded
            .endpoint_at(addr.parse().unwrap())
            .unwrap()
            .record_scrape(m, Instant::now());
    }

    fn in_flight(&self, addr: &str) -> u32 {
        self.state
            .current()
            .unwrap()
            .endpoint_at(addr.parse().unwrap())
            .unwrap()
            .in_flight
            .requests()
    }
}

fn headers(pairs: &[(&str, &str)], eos: bool) -> ProcessingRequest {
    let headers = pairs
        .iter()
        .map(|(k, v)| HeaderValue {
            key: k.to_string(),
            raw_value: v.as_bytes().to_vec(),
            ..Default::default()
        })
        .collect();
    ProcessingRequest {
        request: Some(In::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap { headers }),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn post(path: &str) -> ProcessingRequest {
    headers(
        &[
            (":method", "POST"),
            (":path", path),
            ("x-request-id", "rid-1"),
            ("hi", "mom"),
        ],
        false,
    )
}

fn body(data: &[u8], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(In::RequestBody(HttpBody {
            body: data.to_vec(),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn resp_headers(status: &str, content_type: &str, eos: bool) -> ProcessingRequest {
    let mut m = headers(&[(":status", status), ("content-type", content_type)], eos);
    if let Some(In::RequestHeaders(h)) = m.request.take() {
        m.request = Some(In::ResponseHeaders(h));
    }
    m
}

fn resp_body(data: &[u8], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(In::ResponseBody(HttpBody {
            body: data.to_vec(),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn buffered_mode(mut m: ProcessingRequest) -> ProcessingRequest {
    m.protocol_config = Some(ProtocolConfiguration {
        request_body_mode: 2,
        response_body_mode: 2,
        ..Default::default()
    });
    m
}

fn with_subset(mut m: ProcessingRequest, subset: &[&str]) -> ProcessingRequest {
    let list = Value {
        kind: Some(Kind::ListValue(ListValue {
            values: subset
                .iter()
                .map(|s| Value {
                    kind: Some(Kind::StringValue(s.to_string())),
                })
                .collect(),
        })),
    };
    let mut ns = Struct::default();
    ns.fields.insert(SUBSET_KEY.into(), list);
    let mut fm = HashMap::new();
    fm.insert(SUBSET_NAMESPACE.to_string(), ns);
    m.metadata_context = Some(Metadata {
        filter_metadata: fm,
        ..Default::default()
    });
    m
}

fn run(session: &mut Session, msgs: Vec<ProcessingRequest>) -> Vec<ProcessingResponse> {
    let mut out = VecDeque::new();
    for m in msgs {
        session.handle(m, &mut out);
    }
    out.into()
}

fn set_headers(r: &ProcessingResponse) -> HashMap<String, String> {
    let common = match &r.response {
        Some(Out::RequestHeaders(h)) | Some(Out::ResponseHeaders(h)) => h.response.as_ref(),
        Some(Out::RequestBody(b)) | Some(Out::ResponseBody(b)) => b.response.as_ref(),
        _ => None,
    };
    common
        .and_then(|c| c.header_mutation.as_ref())
        .map(|m| {
            m.set_headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| {
                    (
                        h.key.clone(),
                        String::from_utf8(h.raw_value.clone()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn removed_headers(r: &ProcessingResponse) -> Vec<String> {
    match &r.response {
        Some(Out::RequestHeaders(h)) => h
            .response
            .as_ref()
            .and_then(|c| c.header_mutation.as_ref())
            .map(|m| m.remove_headers.clone())
            .unwrap_or_default(),
        Some(Out::RequestBody(b)) => b
            .response
            .as_ref()
            .and_then(|c| c.header_mutation.as_ref())
            .map(|m| m.remove_headers.clone())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn metadata_destination(r: &ProcessingResponse) -> Option<String> {
    let md = r.dynamic_metadata.as_ref()?;
    let Some(Kind::StructValue(inner)) = &md.fields.get(DESTINATION_NAMESPACE)?.kind else {
        return None;
    };
    match &inner.fields.get(DESTINATION_KEY)?.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

/// The streamed body chunks of `Out::RequestBody` / `Out::ResponseBody` answers.
fn streamed_chunks(rs: &[ProcessingResponse]) -> Vec<(Vec<u8>, bool)> {
    rs.iter()
        .filter_map(|r| match &r.response {
            Some(Out::RequestBody(b)) | Some(Out::ResponseBody(b)) => {
                match b
                    .response
                    .as_ref()?
                    .body_mutation
                    .as_ref()?
                    .mutation
                    .as_ref()?
                {
                    Mutation::StreamedResponse(s) => Some((s.body.clone(), s.end_of_stream)),
                    Mutation::Body(b) => Some((b.clone(), false)),
                    Mutation::ClearBody(_) => None,
                }
            }
            _ => None,
        })
        .collect()
}

fn immediate(rs: &[ProcessingResponse]) -> Option<(i32, String)> {
    rs.iter().find_map(|r| match &r.response {
        Some(Out::ImmediateResponse(ir)) => Some((
            ir.status.as_ref().map(|s| s.code).unwrap_or(0),
            String::from_utf8(ir.body.clone()).unwrap(),
        )),
        _ => None,
    })
}

#[test]
fn full_duplex_defers_headers_until_the_body_ends_and_routes_to_the_best_endpoint() {
    let f = Fixture::new(vec![], vec![]);
    f.b_is_best();
    let mut s = f.service.session();
    let req = br#"{"max_tokens":100,"model":"sql-lora","prompt":"test6","temperature":0}"#;
    let (a, b) = req.split_at(30);
    assert!(
        run(&mut s, vec![post("/v1/completions")]).is_empty(),
        "headers answer must wait for the body"
    );
    assert!(run(&mut s, vec![body(a, false)]).is_empty());
    let out = run(&mut s, vec![body(b, true)]);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(matches!(out[0].response, Some(Out::RequestHeaders(_))));
    let hs = set_headers(&out[0]);
    assert_eq!(hs.get(DESTINATION_KEY).map(String::as_str), Some(B));
    assert_eq!(hs.get("content-length"), Some(&req.len().to_string()));
    assert_eq!(
        metadata_destination(&out[0]).as_deref(),
        Some(B),
        "header and metadata must agree"
    );
    let chunks = streamed_chunks(&out[1..]);
    assert_eq!(chunks, vec![(req.to_vec(), true)]);
    assert_eq!(f.in_flight(B), 1, "the pick counts as in flight");
    drop(s);
    assert_eq!(
        f.in_flight(B),
        0,
        "dropping the stream releases the in-flight count"
    );
}

#[test]
fn client_supplied_internal_headers_are_overwritten_or_removed() {
    let f = Fixture::new(vec![], vec![]);
    f.b_is_best();
    let mut s = f.service.session();
    let out = run(
        &mut s,
        vec![
            headers(
                &[
                    (":path", "/v1/completions"),
                    (DESTINATION_KEY, A),
                    (SERVED_KEY, A),
                    (SUBSET_KEY, A),
                ],
                false,
            ),
            body(br#"{"model":"m","prompt":"p"}"#, true),
        ],
    );
    let hs = set_headers(&out[0]);
    assert_eq!(hs.get(DESTINATION_KEY).map(String::as_str), Some(B));
    let removed = removed_headers(&out[0]);
    assert!(
        removed.contains(&SERVED_KEY.to_string()) && removed.contains(&SUBSET_KEY.to_string()),
        "{removed:?}"
    );
    assert!(
        hs.contains_key("x-request-id"),
        "a request id is generated when absent"
    );
    assert_eq!(hs["x-request-id"].len(), 36);
}

#[test]
fn bad_requests_get_400_with_a_reason_and_end_the_stream() {
    for (body_text, expect) in [
        (&b"no healthy upstream"[..], "not a JSON object"),
        (br#"{"prompt":"hello world"}"#, "model not found"),
    ] {
        let f = Fixture::new(vec![], vec![]);
        let mut s = f.service.session();
        let out = run(&mut s, vec![post("/v1/completions"), body(body_text, true)]);
        let (status, text) = immediate(&out).expect("an immediate response");
        assert_eq!(status, 400);
        assert!(text.contains(expect), "{text}");
        assert!(s.is_finished());
    }
}

#[test]
fn oversized_bodies_get_413_before_buffering_more() {
    let opts = ServerOptions {
        max_request_body_bytes: 100,
        ..Default::default()
    };
    let f = Fixture::with_options(vec![], vec![], opts);
    let mut s = f.service.session();
    let out = run(
        &mut s,
        vec![
            post("/v1/completions"),
            body(&[b' '; 60], false),
            body(&[b' '; 60], false),
        ],
    );
    assert_eq!(immediate(&out).map(|(s, _)| s), Some(413));
}

#[test]
fn subset_hint_restricts_the_pick_and_an_empty_match_is_503() {
    let f = Fixture::new(vec![], vec![]);
    f.b_is_best();
    let mut s = f.service.session();
    let out = run(
        &mut s,
        vec![
            with_subset(post("/v1/completions"), &[A]),
            body(br#"{"model":"m","prompt":"p"}"#, true),
        ],
    );
    assert_eq!(
        set_headers(&out[0])
            .get(DESTINATION_KEY)
            .map(String::as_str),
        Some(A),
        "only A is allowed"
    );

    let mut s = f.service.session();
    let out = run(
        &mut s,
        vec![
            with_subset(post("/v1/completions"), &["10.0.0.1"]),
            body(br#"{"model":"m","prompt":"p"}"#, true),
        ],
    );
    assert_eq!(
        set_headers(&out[0])
            .get(DESTINATION_KEY)
            .map(String::as_str),
        Some(A),
        "a bare IP matches any port"
    );

    let mut s = f.service.session();
    let out = run(
        &mut s,
        vec![
            with_subset(post("/v1/completions"), &["10.9.9.9:8000"]),
            body(br#"{"model":"m","prompt":"p"}"#, true),
        ],
    );
    let (status, text) = immediate(&out).unwrap();
    assert_eq!(status, 503);
    assert!(text.contains("subset"), "{text}");
}

#[test]
fn model_rewrite_header_and_rules_change_the_body_and_come_back_in_the_response() {
    let rules = vec![ModelRewriteRule {
        source: "default/rewrite-test".into(),
        created: String::new(),
        matches: vec!["model-to-be-rewritten".into()],
        targets: vec![RewriteTarget {
            model_rewrite: "rewritten-model".into(),
            weight: 1,
        }],
    }];
    let f = Fixture::new(vec![], rules);
    f.b_is_best();
    let mut s = f.service.session();
    let req = br#"{"model":"model-to-be-rewritten","prompt":"hi","stream":false}"#;
    let out = run(&mut s, vec![post("/v1/completions"), body(req, true)]);
    let sent = &streamed_chunks(&out)[0].0;
    assert_eq!(
        sent.as_slice(),
        br#"{"model":"rewritten-model","prompt":"hi","stream":false}"#
    );
    assert_eq!(
        set_headers(&out[0])["content-length"],
        sent.len().to_string()
    );

    let out = run(
        &mut s,
        vec![
            resp_headers("200", "application/json", false),
            resp_body(
                br#"{"object":"text_completion","model":"rewritten-mo"#,
                false,
            ),
            resp_body(
                br#"del","usage":{"prompt_tokens":7,"completion_tokens":3}}"#,
                true,
            ),
        ],
    );
    let chunks = streamed_chunks(&out);
    assert_eq!(
        chunks.len(),
        1,
        "a non-streamed response is buffered and answered once"
    );
    assert_eq!(
        chunks[0].0.as_slice(),
        br#"{"object":"text_completion","model":"model-to-be-rewritten","usage":{"prompt_tokens":7,"completion_tokens":3}}"#
    );
    assert!(chunks[0].1);
    assert_eq!(f.in_flight(B), 0, "completion releases the in-flight count");
    let text = f.state.metrics().encode();
    assert!(text.contains(r#"inference_objective_input_tokens_sum{model_name="model-to-be-rewritten",target_model_name="rewritten-model"} 7"#), "{text}");
    assert!(text.contains(r#"inference_extension_model_rewrite_decisions_total{model_rewrite_name="default/rewrite-test""#), "{text}");

    let mut s = f.service.session();
    let mut h = post("/v1/chat/completions");
    if let Some(In::RequestHeaders(hh)) = &mut h.request {
        hh.headers.as_mut().unwrap().headers.push(HeaderValue {
            key: MODEL_REWRITE_HEADER.into(),
            raw_value: b"forced".to_vec(),
            ..Default::default()
        });
    }
    let out = run(
        &mut s,
        vec![
            h,
            body(
                br#"{"model":"x","messages":[{"role":"user","content":"hi"}]}"#,
                true,
            ),
        ],
    );
    assert_eq!(
        streamed_chunks(&out)[0].0.as_slice(),
        br#"{"model":"forced","messages":[{"role":"user","content":"hi"}]}"#
    );
}

#[test]
fn streamed_responses_are_forwarded_chunk_by_chunk_with_usage_counted() {
    let f = Fixture::new(vec![], vec![]);
    let mut s = f.service.session();
    run(
        &mut s,
        vec![
            post("/v1/completions"),
            body(br#"{"model":"m","prompt":"p","stream":true}"#, true),
        ],
    );
    let out = run(
        &mut s,
        vec![resp_headers("200", "text/event-stream", false)],
    );
    assert_eq!(out.len(), 1);
    let out = run(&mut s, vec![resp_body(b"data: {}\n\n", false)]);
    assert_eq!(
        streamed_chunks(&out),
        vec![(b"data: {}\n\n".to_vec(), false)],
        "forwarded at once"
    );
    let last = b"data: {\"usage\":{\"prompt_tokens\":7,\"total_tokens\":17,\"completion_tokens\":10}}\n\ndata: [DONE]\n\n";
    let out = run(&mut s, vec![resp_body(last, false), resp_body(b"", true)]);
    assert_eq!(streamed_chunks(&out).len(), 2);
    let text = f.state.metrics().encode();
    assert!(
        text.contains(
            r#"inference_objective_output_tokens_sum{model_name="m",target_model_name="m"} 10"#
        ),
        "{text}"
    );
}

#[test]
fn a_megabyte_prompt_crosses_chunk_boundaries_intact() {
    let f = Fixture::new(vec![], vec![]);
    let prompt = "x".repeat(1 << 20);
    let req = format!(r#"{{"model":"m","prompt":"{prompt}"}}"#);
    let mut s = f.service.session();
    let mut msgs = vec![post("/v1/completions")];
    let parts: Vec<&[u8]> = req.as_bytes().chunks(16_384).collect();
    let n = parts.len();
    for (i, p) in parts.into_iter().enumerate() {
        msgs.push(body(p, i + 1 == n));
    }
    let out = run(&mut s, msgs);
    let chunks = streamed_chunks(&out);
    assert!(chunks.iter().all(|(c, _)| c.len() <= BODY_CHUNK));
    assert_eq!(chunks.iter().filter(|(_, eos)| *eos).count(), 1);
    assert!(chunks.last().unwrap().1);
    let joined: Vec<u8> = chunks.into_iter().flat_map(|(c, _)| c).collect();
    assert_eq!(joined, req.as_bytes());
}

#[test]
fn buffered_mode_answers_headers_then_routes_on_the_body() {
    let f = Fixture::new(vec![], vec![]);
    f.b_is_best();
    let mut s = f.service.session();
    let out = run(&mut s, vec![buffered_mode(post("/v1/completions"))]);
    assert_eq!(
        out.len(),
        1,
        "headers are answered at once in buffered mode"
    );
    assert!(set_headers(&out[0]).is_empty());
    let out = run(&mut s, vec![body(br#"{"model":"m","prompt":"p"}"#, true)]);
    assert_eq!(out.len(), 1);
    assert!(matches!(out[0].response, Some(Out::RequestBody(_))));
    assert_eq!(
        set_headers(&out[0])
            .get(DESTINATION_KEY)
            .map(String::as_str),
        Some(B)
    );
    assert_eq!(metadata_destination(&out[0]).as_deref(), Some(B));
}

#[test]
fn bodiless_requests_are_routed_at_the_headers() {
    let f = Fixture::new(vec![], vec![]);
    let mut s = f.service.session();
    let out = run(
        &mut s,
        vec![headers(
            &[(":method", "GET"), (":path", "/v1/models")],
            true,
        )],
    );
    assert_eq!(out.len(), 1);
    let dest = set_headers(&out[0]).remove(DESTINATION_KEY).unwrap();
    assert!(dest == A || dest == B, "{dest}");
}

#[test]
fn sheddable_requests_get_429_when_the_pool_is_saturated() {
    let f = Fixture::new(
        vec![Objective {
            name: "batch".into(),
            priority: -1,
        }],
        vec![],
    );
    f.set_metrics(A, metrics(50, 0.99));
    f.set_metrics(B, metrics(50, 0.99));
    let mut s = f.service.session();
    let mut h = post("/v1/completions");
    if let Some(In::RequestHeaders(hh)) = &mut h.request {
        hh.headers.as_mut().unwrap().headers.push(HeaderValue {
            key: "x-gateway-inference-objective".into(),
            raw_value: b"batch".to_vec(),
            ..Default::default()
        });
    }
    let out = run(
        &mut s,
        vec![h, body(br#"{"model":"m","prompt":"p"}"#, true)],
    );
    let (status, text) = immediate(&out).expect("shed");
    assert_eq!(status, 429, "{text}");

    // The same request without the sheddable objective is served.
    let mut s = f.service.session();
    let out = run(
        &mut s,
        vec![
            post("/v1/completions"),
            body(br#"{"model":"m","prompt":"p"}"#, true),
        ],
    );
    assert!(immediate(&out).is_none());
}

#[test]
fn no_configuration_means_503_not_a_hang() {
    let state = PickerState::new(Arc::new(Metrics::new()), None, None);
    let svc = ExtProcService::new(state, ServerOptions::default());
    let mut s = svc.session();
    let out = run(
        &mut s,
        vec![
            post("/v1/completions"),
            body(br#"{"model":"m","prompt":"p"}"#, true),
        ],
    );
    assert_eq!(immediate(&out).map(|(s, _)| s), Some(503));
}

#[test]
fn request_trailers_end_the_body_in_full_duplex_mode() {
    let f = Fixture::new(vec![], vec![]);
    let mut s = f.service.session();
    let trailers = ProcessingRequest {
        request: Some(In::RequestTrailers(HttpTrailers::default())),
        ..Default::default()
    };
    let out = run(
        &mut s,
        vec![
            post("/v1/completions"),
            body(br#"{"model":"m","prompt":"p"}"#, false),
            trailers,
        ],
    );
    assert!(matches!(
        out.first().and_then(|r| r.response.as_ref()),
        Some(Out::RequestHeaders(_))
    ));
    assert!(matches!(
        out.last().and_then(|r| r.response.as_ref()),
        Some(Out::RequestTrailers(_))
    ));
    assert_eq!(
        streamed_chunks(&out),
        vec![(br#"{"model":"m","prompt":"p"}"#.to_vec(), false)]
    );
}

#[test]
fn snapshots_swap_without_disturbing_requests_in_flight() {
    let f = Fixture::new(vec![], vec![]);
    f.b_is_best();
    let mut s = f.service.session();
    run(
        &mut s,
        vec![
            post("/v1/completions"),
            body(br#"{"model":"m","prompt":"p"}"#, true),
        ],
    );
    // A new snapshot that drops B: the in-flight request still completes against its own.
    let snap = standalone::snapshot(
        PoolRef {
            namespace: "default".into(),
            name: "pool".into(),
        },
        2,
        vec![Endpoint::from_address("default", A.parse().unwrap())],
        Default::default(),
    );
    assert!(matches!(
        f.state.apply_snapshot(snap.clone()),
        Ok(crate::state::Applied::Swapped)
    ));
    let out = run(
        &mut s,
        vec![
            resp_headers("200", "application/json", false),
            resp_body(b"{}", true),
        ],
    );
    assert_eq!(streamed_chunks(&out).len(), 1);
    let err = f.state.apply_snapshot(snap).unwrap_err();
    assert!(err.to_string().contains("not newer"), "{err}");
}

#[path = "extproc_flow_tests.rs"]
mod flow;

#[path = "extproc_slo_tests.rs"]
mod slo;

#[test]
fn scheduled_requests_export_plugin_durations_under_each_plugins_labels() {
    let f = Fixture::new(vec![], vec![]);
    f.b_is_best();
    let req = br#"{"model":"m","prompt":"hello plugins"}"#;
    for _ in 0..3 {
        let mut s = f.service.session();
        let out = run(&mut s, vec![post("/v1/completions"), body(req, true)]);
        assert_eq!(
            set_headers(&out[0])
                .get(DESTINATION_KEY)
                .map(String::as_str),
            Some(B)
        );
        run(
            &mut s,
            vec![
                resp_headers("200", "application/json", false),
                resp_body(br#"{"model":"m","usage":{"prompt_tokens":3}}"#, true),
            ],
        );
    }
    let text = f.state.metrics().encode();
    // The default profile: every scheduled request ran each of these once.
    for (point, ty) in [
        ("Scorer", "queue-scorer"),
        ("Scorer", "kv-cache-utilization-scorer"),
        ("Scorer", "prefix-cache-scorer"),
        ("Picker", "max-score-picker"),
    ] {
        let want = format!(
            r#"inference_extension_plugin_duration_seconds_count{{extension_point="{point}",plugin_type="{ty}",plugin_name="{ty}"}} 3"#
        );
        assert!(text.contains(&want), "missing {want} in\n{text}");
    }
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("inference_extension_plugin_duration_seconds_count{"))
        .collect();
    assert!(
        counted.iter().all(|l| !l.contains("plugin_type=\"\"")),
        "every observed plugin has its type: {counted:#?}"
    );
    assert_eq!(
        f.state
            .current()
            .unwrap()
            .router
            .plugin_durations()
            .misses(),
        0,
        "every plugin call found its pre-resolved series: {counted:#?}"
    );
}

fn with_served(mut m: ProcessingRequest, served: &str) -> ProcessingRequest {
    let mut ns = Struct::default();
    ns.fields.insert(
        SERVED_KEY.into(),
        Value {
            kind: Some(Kind::StringValue(served.to_string())),
        },
    );
    let mut fm = HashMap::new();
    fm.insert(DESTINATION_NAMESPACE.to_string(), ns);
    m.metadata_context = Some(Metadata {
        filter_metadata: fm,
        ..Default::default()
    });
    m
}

#[test]
fn a_request_served_by_a_fallback_counts_in_flight_on_the_endpoint_that_served_it() {
    let f = Fixture::new(vec![], vec![]);
    f.b_is_best();
    let req = br#"{"model":"m","prompt":"a prompt long enough to count some tokens"}"#;
    let fallbacks = || f.state.metrics().fallback_served.get();

    // Picked B; Envoy retried on A and reports A as the endpoint that served it.
    let mut s = f.service.session();
    run(&mut s, vec![post("/v1/completions"), body(req, true)]);
    assert_eq!((f.in_flight(A), f.in_flight(B)), (0, 1));
    let tokens_on = |addr: &str| {
        f.state
            .current()
            .unwrap()
            .endpoint_at(addr.parse().unwrap())
            .unwrap()
            .in_flight
            .tokens()
    };
    let tokens = tokens_on(B);
    assert!(tokens > 0);
    run(
        &mut s,
        vec![with_served(
            resp_headers("200", "text/event-stream", false),
            A,
        )],
    );
    assert_eq!(
        (f.in_flight(A), f.in_flight(B)),
        (1, 0),
        "while in flight the serving endpoint carries the request"
    );
    assert_eq!((tokens_on(A), tokens_on(B)), (tokens, 0));
    assert_eq!(fallbacks(), 1);
    // Later messages repeat the same served key: nothing moves twice.
    run(
        &mut s,
        vec![with_served(resp_body(b"data: {}\n\n", false), A)],
    );
    assert_eq!((f.in_flight(A), f.in_flight(B)), (1, 0));
    assert_eq!(fallbacks(), 1);
    run(&mut s, vec![resp_body(b"data: [DONE]\n\n", true)]);
    assert_eq!(
        (f.in_flight(A), f.in_flight(B)),
        (0, 0),
        "the end of the stream releases the served endpoint"
    );
    assert_eq!((tokens_on(A), tokens_on(B)), (0, 0));
    drop(s);
    assert_eq!((f.in_flight(A), f.in_flight(B)), (0, 0));

    // Garbage, an address outside the pool, and the pick itself change nothing.
    for served in ["not an address", "10.9.9.9:8000", B, ""] {
        let mut s = f.service.session();
        run(&mut s, vec![post("/v1/completions"), body(req, true)]);
        run(
            &mut s,
            vec![with_served(
                resp_headers("200", "application/json", false),
                served,
            )],
        );
        assert_eq!(
            (f.in_flight(A), f.in_flight(B)),
            (0, 1),
            "served {served:?}"
        );
        drop(s);
        assert_eq!(
            (f.in_flight(A), f.in_flight(B)),
            (0, 0),
            "served {served:?}"
        );
    }
    assert_eq!(fallbacks(), 1);
}
