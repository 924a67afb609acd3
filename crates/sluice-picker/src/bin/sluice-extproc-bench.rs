//! Benchmark helpers for `cargo xtask bench-extproc`:
//!
//! - `floor`: a do-nothing ext_proc processor (the floor of `extproc-floor.md`): in
//!   FULL_DUPLEX_STREAMED mode it holds the request-headers answer until the body ends,
//!   then sets `x-gateway-destination-endpoint` to the next of its endpoints (round-robin
//!   per stream, so the upstream side carries the same spread of work as with the picker)
//!   and echoes every body chunk; in BUFFERED mode it answers headers with CONTINUE and the
//!   body with the mutation.
//! - `http`: a closed-loop HTTP load driver printing one JSON line (rate, p50, p99).
//! - `grpc`: drives an ext_proc server directly (no Envoy) with complete request/response
//!   conversations and prints one JSON line (rate).
//! - `session`: runs complete conversations through the picker's session state machine
//!   in-process (no gRPC, no Envoy) on one thread and prints one JSON line (ns per request):
//!   the picker's own per-request work, stable under `valgrind --tool=callgrind` (run two
//!   request counts and take the difference to cancel start-up).

// The report is the product of this tool: it goes to stdout.
#![allow(clippy::print_stdout)]

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as In;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Out;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpBody, HttpHeaders,
    ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use futures::Stream;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluice_picker::errors::set_header;
use sluice_picker::extproc::{reply, streamed};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

// The same allocator as sluice-picker, so the floor and the picker differ only in their logic.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "ext_proc benchmark helpers")]
struct Cli {
    /// Tokio worker threads (default: one per CPU); the bench gives the floor and the
    /// picker the same runtime shape.
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Parts of sluice-picker's routing answer the floor can add (`floor --like-sluice`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FloorExtra {
    /// `envoy.lb` / `x-gateway-destination-endpoint` dynamic metadata.
    Metadata,
    /// A `content-length` header with the request body's length.
    ContentLength,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the do-nothing processor.
    Floor {
        /// Listen port on 127.0.0.1.
        #[arg(long)]
        port: u16,
        /// The endpoints requests are sent to, `HOST:PORT,...`, in turn.
        #[arg(long)]
        endpoint: String,
        /// Also send what sluice-picker's routing answer carries beyond the destination
        /// header, to measure what it costs Envoy: `metadata` (the `envoy.lb` dynamic
        /// metadata with the same value) and/or `content-length` (the body's length as a
        /// header). Default: nothing, the do-nothing floor of extproc-floor.md.
        #[arg(long, value_delimiter = ',')]
        like_sluice: Vec<FloorExtra>,
    },
    /// Closed-loop HTTP load.
    Http {
        /// Target base URL.
        #[arg(long)]
        url: String,
        /// Concurrent connections.
        #[arg(long)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long)]
        duration: f64,
        /// Model name in the body.
        #[arg(long)]
        model: String,
        /// Request body size (the prompt is padded to it).
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
    },
    /// Drive an ext_proc server directly.
    Grpc {
        /// `http://127.0.0.1:PORT` of a plaintext ext_proc server.
        #[arg(long)]
        addr: String,
        /// Concurrent streams.
        #[arg(long)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long)]
        duration: f64,
        /// Model name in the body.
        #[arg(long)]
        model: String,
    },
    /// Run conversations through in-process sessions.
    Session {
        /// Conversations to run.
        #[arg(long, default_value_t = 10_000)]
        requests: u64,
        /// Endpoints in the pool (default profile).
        #[arg(long, default_value_t = 8)]
        endpoints: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads {
        builder.worker_threads(usize::from(n));
    }
    let rt = builder.enable_all().build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Floor {
                port,
                endpoint,
                like_sluice,
            } => floor(port, endpoint, &like_sluice).await,
            Cmd::Http {
                url,
                concurrency,
                duration,
                model,
                body_bytes,
            } => http_load(url, concurrency, duration, model, body_bytes).await,
            Cmd::Grpc {
                addr,
                concurrency,
                duration,
                model,
            } => grpc_load(addr, concurrency, duration, model).await,
            Cmd::Session {
                requests,
                endpoints,
            } => session_load(requests, endpoints),
        }
    })
}

// ---------------------------------------------------------------- floor

#[derive(Debug, Clone)]
struct Floor {
    endpoints: Arc<[Arc<str>]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    metadata: bool,
    content_length: bool,
}

struct FloorStream {
    inbound: Streaming<ProcessingRequest>,
    endpoint: Arc<str>,
    out: VecDeque<ProcessingResponse>,
    headers_pending: bool,
    held: Vec<(Vec<u8>, bool)>,
    full_duplex: bool,
    done: bool,
    metadata: bool,
    content_length: bool,
}

impl FloorStream {
    fn mutation(&self) -> CommonResponse {
        let mut set_headers = vec![set_header("x-gateway-destination-endpoint", &self.endpoint)];
        let body_len: usize = self.held.iter().map(|(b, _)| b.len()).sum();
        if self.content_length && body_len > 0 {
            set_headers.push(set_header("content-length", &body_len.to_string()));
        }
        CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers,
                remove_headers: Vec::new(),
            }),
            clear_route_cache: true,
            ..Default::default()
        }
    }

    /// Adds the `envoy.lb` metadata to a routing answer when the floor imitates sluice.
    fn with_metadata(&self, mut r: ProcessingResponse, routed: bool) -> ProcessingResponse {
        if self.metadata && routed {
            r.dynamic_metadata = Some(sluice_picker::extproc::destination_metadata(&self.endpoint));
        }
        r
    }

    fn handle(&mut self, msg: ProcessingRequest) {
        if let Some(pc) = &msg.protocol_config {
            self.full_duplex = pc.request_body_mode == 4;
        }
        match msg.request {
            Some(In::RequestHeaders(h)) => {
                if h.end_of_stream || !self.full_duplex {
                    let m = self.mutation();
                    let common = if h.end_of_stream { Some(m) } else { None };
                    let routed = common.is_some();
                    let r = reply(Out::RequestHeaders(HeadersResponse { response: common }));
                    self.out.push_back(self.with_metadata(r, routed));
                } else {
                    self.headers_pending = true;
                }
            }
            Some(In::RequestBody(b)) => {
                if self.full_duplex {
                    // Body answers may not precede the headers answer, which waits for the
                    // end of the body: hold the chunks until then.
                    self.held.push((b.body, b.end_of_stream));
                    if b.end_of_stream {
                        if self.headers_pending {
                            self.headers_pending = false;
                            let m = self.mutation();
                            let r =
                                reply(Out::RequestHeaders(HeadersResponse { response: Some(m) }));
                            self.out.push_back(self.with_metadata(r, true));
                        }
                        for (body, eos) in std::mem::take(&mut self.held) {
                            self.out
                                .push_back(reply(Out::RequestBody(streamed(body, eos))));
                        }
                    }
                } else {
                    self.held.push((b.body, b.end_of_stream));
                    let m = self.mutation();
                    self.held.clear();
                    let r = reply(Out::RequestBody(BodyResponse { response: Some(m) }));
                    self.out.push_back(self.with_metadata(r, true));
                }
            }
            Some(In::ResponseHeaders(_)) => self
                .out
                .push_back(reply(Out::ResponseHeaders(HeadersResponse::default()))),
            Some(In::ResponseBody(b)) => {
                let r = if self.full_duplex {
                    streamed(b.body, b.end_of_stream)
                } else {
                    BodyResponse::default()
                };
                self.out.push_back(reply(Out::ResponseBody(r)));
            }
            Some(In::RequestTrailers(_)) => self
                .out
                .push_back(reply(Out::RequestTrailers(TrailersResponse::default()))),
            Some(In::ResponseTrailers(_)) => self
                .out
                .push_back(reply(Out::ResponseTrailers(TrailersResponse::default()))),
            None => {}
        }
    }
}

impl Stream for FloorStream {
    type Item = Result<ProcessingResponse, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(r) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(m))) => this.handle(m),
                Poll::Ready(_) => this.done = true,
            }
        }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Floor {
    type ProcessStream = FloorStream;
    async fn process(
        &self,
        req: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Response::new(FloorStream {
            inbound: req.into_inner(),
            endpoint: Arc::clone(&self.endpoints[turn % self.endpoints.len()]),
            out: VecDeque::with_capacity(4),
            headers_pending: false,
            held: Vec::new(),
            full_duplex: true,
            done: false,
            metadata: self.metadata,
            content_length: self.content_length,
        }))
    }
}

async fn floor(port: u16, endpoint: String, extra: &[FloorExtra]) -> Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let endpoints: Arc<[Arc<str>]> = endpoint
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(Arc::from)
        .collect();
    if endpoints.is_empty() {
        anyhow::bail!("--endpoint needs at least one HOST:PORT");
    }
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(ExternalProcessorServer::new(Floor {
            endpoints,
            next: Arc::default(),
            metadata: extra.contains(&FloorExtra::Metadata),
            content_length: extra.contains(&FloorExtra::ContentLength),
        }))
        .serve(addr)
        .await
        .context("floor processor")
}

// ---------------------------------------------------------------- load

fn body_of(model: &str, bytes: usize) -> Bytes {
    let head = format!(r#"{{"model":"{model}","max_tokens":1,"prompt":""#);
    let pad = bytes.saturating_sub(head.len() + 2).max(1);
    Bytes::from(format!("{head}{}\"}}", "a".repeat(pad)))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn http_load(
    url: String,
    concurrency: usize,
    duration: f64,
    model: String,
    body_bytes: usize,
) -> Result<()> {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build(HttpConnector::new());
    let body = body_of(&model, body_bytes);
    let stop = Arc::new(AtomicBool::new(false));
    let uri: http::Uri = format!("{url}/v1/completions").parse()?;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, body, stop, uri) =
            (client.clone(), body.clone(), Arc::clone(&stop), uri.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()));
                let Ok(req) = req else { break };
                let t = Instant::now();
                match client.request(req).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let _ = resp.into_body().collect().await;
                        if ok {
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(duration)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let wall = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "requests": all.len(), "errors": errors, "rps": all.len() as f64 / wall,
            "p50_ms": percentile(&all, 0.5), "p99_ms": percentile(&all, 0.99),
        })
    );
    Ok(())
}

fn hdrs(pairs: &[(&str, &str)], eos: bool) -> HttpHeaders {
    HttpHeaders {
        headers: Some(HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        }),
        end_of_stream: eos,
        ..Default::default()
    }
}

async fn one_conversation(
    client: &mut ExternalProcessorClient<tonic::transport::Channel>,
    body: &Bytes,
) -> Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let msg = |r: In| ProcessingRequest {
        request: Some(r),
        ..Default::default()
    };
    tx.send(msg(In::RequestHeaders(hdrs(
        &[(":method", "POST"), (":path", "/v1/completions")],
        false,
    ))))
    .await?;
    tx.send(msg(In::RequestBody(HttpBody {
        body: body.to_vec(),
        end_of_stream: true,
        ..Default::default()
    })))
    .await?;
    let mut responses = client
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Headers answer, then the body.
    for _ in 0..2 {
        let r = responses.next().await.context("stream ended early")??;
        if let Some(Out::ImmediateResponse(ir)) = r.response {
            anyhow::bail!(
                "picker answered {:?}: {}",
                ir.status,
                String::from_utf8_lossy(&ir.body)
            );
        }
    }
    tx.send(msg(In::ResponseHeaders(hdrs(
        &[(":status", "200"), ("content-type", "application/json")],
        false,
    ))))
    .await?;
    tx.send(msg(In::ResponseBody(HttpBody {
        body: br#"{"object":"text_completion","usage":{"prompt_tokens":10,"completion_tokens":1}}"#
            .to_vec(),
        end_of_stream: true,
        ..Default::default()
    })))
    .await?;
    drop(tx);
    while let Some(r) = responses.next().await {
        r?;
    }
    Ok(())
}

async fn grpc_load(addr: String, concurrency: usize, duration: f64, model: String) -> Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(addr)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let body = body_of(&model, 1024);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = ExternalProcessorClient::new(channel.clone());
        let (body, stop) = (body.clone(), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let (mut n, mut errors) = (0u64, 0u64);
            let mut first_error = None;
            while !stop.load(Ordering::Relaxed) {
                match one_conversation(&mut client, &body).await {
                    Ok(()) => n += 1,
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(format!("{e:#}"));
                    }
                }
            }
            (n, errors, first_error)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(duration)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut n, mut errors, mut first) = (0, 0, None);
    for t in tasks {
        let (a, b, f) = t.await?;
        n += a;
        errors += b;
        first = first.or(f);
    }
    let wall = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"requests": n, "errors": errors, "rps": n as f64 / wall, "first_error": first})
    );
    Ok(())
}

// ---------------------------------------------------------------- in-process sessions

/// What a simulator answers a non-streamed completion with (serde_json orders keys, so
/// `usage` comes last, as with the simulator).
const SIM_RESPONSE: &[u8] = br#"{"choices":[{"finish_reason":"length","index":0,"logprobs":null,"stop_reason":null,"text":" the quick brown fox"}],"created":1763930000,"id":"cmpl-5f2c9a7e4b1d4c7e9a3f6b2d8e1c0a94","model":"meta-llama/Llama-3.1-8B-Instruct","object":"text_completion","usage":{"completion_tokens":1,"prompt_tokens":246,"total_tokens":247}}"#;

fn session_load(requests: u64, endpoints: usize) -> Result<()> {
    use sluice_core::{Endpoint, EndpointMetrics, PoolRef};
    use sluice_picker::metrics::Metrics;
    use sluice_picker::{ExtProcService, PickerState, ServerOptions, standalone};

    let state = PickerState::new(Arc::new(Metrics::new()), None, None);
    let addrs: Vec<std::net::SocketAddr> = (0..endpoints)
        .map(|i| std::net::SocketAddr::from(([10, 0, 0, 1 + i as u8], 8000)))
        .collect();
    let eps = addrs
        .iter()
        .map(|a| Endpoint::from_address("default", *a))
        .collect();
    let pool = PoolRef {
        namespace: "default".into(),
        name: "bench".into(),
    };
    state
        .apply_snapshot(standalone::snapshot(pool, 1, eps, Default::default()))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let loaded = state.current().context("snapshot applied")?;
    for (i, a) in addrs.iter().enumerate() {
        if let Some(ep) = loaded.endpoint_at(*a) {
            ep.record_scrape(
                EndpointMetrics {
                    waiting_queue_size: (i % 3) as u32,
                    running_requests_size: 4 + i as u32,
                    kv_cache_usage: 0.1 + 0.05 * i as f64,
                    ..Default::default()
                },
                Instant::now(),
            );
        }
    }
    let service = ExtProcService::new(state.clone(), ServerOptions::default());
    let model = "meta-llama/Llama-3.1-8B-Instruct";
    let body = body_of(model, 1024);
    let request_headers = |i: u64| {
        let id = format!("9f1c2e7a-4b3d-4e8f-a1b2-{i:012x}");
        let len = body.len().to_string();
        hdrs(
            &[
                (":authority", "127.0.0.1:8081"),
                (":path", "/v1/completions"),
                (":method", "POST"),
                (":scheme", "http"),
                ("content-type", "application/json"),
                ("content-length", &len),
                ("x-forwarded-proto", "http"),
                ("x-request-id", &id),
            ],
            false,
        )
    };
    let response_headers = hdrs(
        &[
            (":status", "200"),
            ("content-type", "application/json"),
            ("content-length", &SIM_RESPONSE.len().to_string()),
            ("date", "Sun, 23 Nov 2026 21:00:00 GMT"),
        ],
        false,
    );
    let msg = |r: In| ProcessingRequest {
        request: Some(r),
        ..Default::default()
    };
    let mut out = VecDeque::with_capacity(8);
    let started = Instant::now();
    for i in 0..requests {
        let mut session = service.session();
        session.handle(msg(In::RequestHeaders(request_headers(i))), &mut out);
        session.handle(
            msg(In::RequestBody(HttpBody {
                body: body.to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            &mut out,
        );
        if let Some(Out::ImmediateResponse(ir)) = out.front().and_then(|r| r.response.as_ref()) {
            anyhow::bail!(
                "picker answered {:?}: {}",
                ir.status,
                String::from_utf8_lossy(&ir.body)
            );
        }
        session.handle(msg(In::ResponseHeaders(response_headers.clone())), &mut out);
        session.handle(
            msg(In::ResponseBody(HttpBody {
                body: SIM_RESPONSE.to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            &mut out,
        );
        drop(session);
        out.clear();
    }
    let elapsed = started.elapsed();
    println!(
        "{}",
        serde_json::json!({
            "requests": requests,
            "ns_per_request": elapsed.as_nanos() as f64 / requests.max(1) as f64,
        })
    );
    Ok(())
}
