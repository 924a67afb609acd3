//! The Envoy ext_proc server: one gRPC stream per HTTP request.
//!
//! Each stream is a [`Session`] state machine driven by the messages Envoy sends. Handling
//! a message is synchronous (parse, schedule, build responses), so no task is spawned per
//! request: [`SessionStream`] polls the inbound stream and yields the responses each message
//! produced, in order. When the stream goes away (request finished, client gone, Envoy
//! restarted) the session is dropped and its drop completes the request exactly once, so
//! in-flight counts never leak.
//!
//! Processing modes (`protocol_config` on the first message tells which; without it the
//! server's configured default applies):
//! - request body `FULL_DUPLEX_STREAMED` (upstream's mode): the request-headers answer is
//!   held until the body is complete, then the header mutation goes out followed by the
//!   (possibly rewritten) body in 62,000-byte `streamed_response` chunks;
//! - request body `BUFFERED` / `STREAMED`: headers are answered with CONTINUE, and the
//!   routing header mutation rides on the body answer;
//! - request body `NONE`, or a request without a body: routed at the headers.

use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as In;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Out;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpBody,
    HttpHeaders, ProcessingRequest, ProcessingResponse, StreamedBodyResponse, TrailersResponse,
    body_mutation,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use futures::Stream;
use rand::Rng;
use sluice_flowcontrol::{Admission, AdmissionGuard, DROPPED_REASON_HEADER};
use sluice_predictor::PredictResult;
use sluice_scheduling::plugins::slo::{
    DEFERRED_PREDICTION_KEY, DeferredPrediction, PrefetchedPredictions, SloLabels,
};
use sluice_scheduling::{Candidate, LlmRequest, Outcome, ResponseChunk, ScheduleError, Scheduled};
use tonic::{Request, Response, Status, Streaming};

use crate::errors::{ErrorCode, RequestError, set_header};
use crate::metrics::{AttemptLabels, ErrorLabels, ModelSeries, RewriteLabels};
use crate::parse::{parse_request, splice_model};
use crate::response::{SseUsageScanner, Usage, rewrite_model_back, usage_from_json};
use crate::schedule::Router;
use crate::state::{Loaded, PickerState};

/// `envoy.lb`: dynamic-metadata namespace of the destination (and of the served endpoint).
pub const DESTINATION_NAMESPACE: &str = "envoy.lb";
/// The destination header and metadata key.
pub const DESTINATION_KEY: &str = "x-gateway-destination-endpoint";
/// The served-endpoint metadata key the data plane reports.
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
/// Subset-hint metadata namespace.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Subset-hint key.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Objective header (GIE v1.x) and its llm-d-router successor.
pub const OBJECTIVE_HEADERS: [&str; 2] = [
    "x-llm-d-inference-objective",
    "x-gateway-inference-objective",
];
/// Forces the target model.
pub const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";
/// Upstream's body chunk size for streamed body answers.
pub const BODY_CHUNK: usize = 62_000;

/// Internal headers a client must not be able to set: they are removed from the request
/// before it reaches a model server (the destination header is overwritten instead).
pub const INTERNAL_REQUEST_HEADERS: [&str; 3] = [
    SERVED_KEY,
    SUBSET_KEY,
    "x-gateway-destination-endpoint-fallback",
];

// Envoy's `ProcessingMode.BodySendMode` values.
const MODE_NONE: i32 = 0;
const MODE_BUFFERED: i32 = 2;
const MODE_FULL_DUPLEX: i32 = 4;

/// How the ext_proc server behaves; the defaults match upstream where it has an equivalent.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest request body accepted (413 above it).
    pub max_request_body_bytes: usize,
    /// Largest non-streamed response body buffered for usage parsing and the model rewrite;
    /// above it the response streams through untouched.
    pub max_response_buffer_bytes: usize,
    /// Request body mode assumed when Envoy does not announce one.
    pub default_request_body_mode: i32,
    /// Response body mode assumed when Envoy does not announce one.
    pub default_response_body_mode: i32,
    /// Ignore the subset hint (upstream's `--disable-endpoint-subset-filter`).
    pub disable_subset_filter: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_request_body_bytes: 16 << 20,
            max_response_buffer_bytes: 16 << 20,
            default_request_body_mode: MODE_FULL_DUPLEX,
            default_response_body_mode: MODE_FULL_DUPLEX,
            disable_subset_filter: false,
        }
    }
}

/// The `ExternalProcessor` gRPC service.
#[derive(Debug, Clone)]
pub struct ExtProcService {
    state: PickerState,
    opts: Arc<ServerOptions>,
}

impl ExtProcService {
    /// A service routing with `state`.
    pub fn new(state: PickerState, opts: ServerOptions) -> Self {
        ExtProcService {
            state,
            opts: Arc::new(opts),
        }
    }

    /// A session for one stream (exposed for tests and benchmarks that drive the state
    /// machine without gRPC).
    pub fn session(&self) -> Session {
        Session::new(self.state.clone(), Arc::clone(&self.opts))
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = SessionStream<Streaming<ProcessingRequest>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        Ok(Response::new(SessionStream::new(
            request.into_inner(),
            self.session(),
        )))
    }
}

/// Drives a [`Session`] from an inbound message stream.
#[derive(Debug)]
pub struct SessionStream<S> {
    inbound: S,
    session: Session,
    out: VecDeque<ProcessingResponse>,
    done: bool,
}

impl<S> SessionStream<S> {
    /// Wraps `inbound`.
    pub fn new(inbound: S, session: Session) -> Self {
        SessionStream {
            inbound,
            session,
            out: VecDeque::with_capacity(4),
            done: false,
        }
    }
}

impl<S> Stream for SessionStream<S>
where
    S: Stream<Item = Result<ProcessingRequest, Status>> + Unpin,
{
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
            if this.session.pending.is_some() {
                // Nothing more is read from Envoy while flow control holds the request.
                match this.session.poll_admission(cx, &mut this.out) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => {
                        this.done = this.session.finished;
                        continue;
                    }
                }
            }
            if this.session.predicting.is_some() {
                // Nor while a remote latency prediction is on its way.
                match this.session.poll_prediction(cx, &mut this.out) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => {
                        this.done = this.session.finished;
                        continue;
                    }
                }
            }
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.done = true;
                    this.session.end_of_stream();
                }
                Poll::Ready(Some(Err(status))) => {
                    // Envoy cancelled or reset the stream: nothing more will be read.
                    this.done = true;
                    tracing::debug!(code = ?status.code(), "ext_proc stream ended by the proxy");
                    this.session.end_of_stream();
                }
                Poll::Ready(Some(Ok(msg))) => {
                    this.session.handle(msg, &mut this.out);
                    this.done = this.session.finished;
                }
            }
        }
    }
}

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for request headers.
    Start,
    /// Headers seen, collecting the body.
    RequestBody,
    /// Routed; waiting for the response.
    Routed,
}

/// The routing decision and what the response side needs from it.
#[derive(Debug)]
struct Routed {
    loaded: Arc<Loaded>,
    request: LlmRequest,
    scheduled: Option<Scheduled>,
    labels: Option<Arc<ModelSeries>>,
    incoming_model: String,
    target_model: String,
    /// Flow control's permit: held until the response completes (none without flow
    /// control, or when the profile handler skips saturation detection for the request).
    admission: Option<AdmissionGuard>,
}

/// A parsed request, ready to schedule.
#[derive(Debug)]
struct Prepared {
    loaded: Arc<Loaded>,
    request: LlmRequest,
    labels: Arc<ModelSeries>,
    incoming: String,
    target: String,
    body: Bytes,
    body_eos: bool,
    t0: Instant,
}

/// A request waiting in flow control.
#[derive(Debug)]
struct Pending {
    prepared: Prepared,
    admission: Admission,
}

/// A request whose latency predictions come from an asynchronous (remote) predictor: the
/// scheduler decided with the composite score and asked for predictions; the decision is
/// taken again once they arrive, or kept if the predictor fails.
struct Predicting {
    prepared: Prepared,
    cands: Vec<Candidate>,
    admission: Option<AdmissionGuard>,
    fallback: Scheduled,
    endpoints: Vec<sluice_core::EndpointKey>,
    answer: Pin<Box<dyn Future<Output = PredictResult> + Send>>,
    asked_at: Instant,
}

impl std::fmt::Debug for Predicting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predicting")
            .field("request_id", &self.prepared.request.request_id)
            .field("endpoints", &self.endpoints.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct ResponseState {
    status: Option<u16>,
    streaming: bool,
    buffer: Vec<u8>,
    passthrough: bool,
    sse: SseUsageScanner,
    usage: Option<Usage>,
    bytes: u64,
    first_byte: Option<Instant>,
    ended: bool,
}

/// One HTTP request's ext_proc conversation.
#[derive(Debug)]
pub struct Session {
    state: PickerState,
    opts: Arc<ServerOptions>,
    request_mode: i32,
    response_mode: i32,
    phase: Phase,
    headers: Vec<(String, String)>,
    path: String,
    request_id: String,
    generated_id: bool,
    present_internal: Vec<&'static str>,
    subset: Option<Vec<String>>,
    served: Option<String>,
    body: Vec<u8>,
    started: Instant,
    routed: Option<Routed>,
    pending: Option<Pending>,
    predicting: Option<Predicting>,
    resp: ResponseState,
    completed: bool,
    finished: bool,
}

impl Session {
    fn new(state: PickerState, opts: Arc<ServerOptions>) -> Self {
        Session {
            request_mode: opts.default_request_body_mode,
            response_mode: opts.default_response_body_mode,
            state,
            opts,
            phase: Phase::Start,
            headers: Vec::new(),
            path: String::new(),
            request_id: String::new(),
            generated_id: false,
            present_internal: Vec::new(),
            subset: None,
            served: None,
            body: Vec::new(),
            started: Instant::now(),
            routed: None,
            pending: None,
            predicting: None,
            resp: ResponseState::default(),
            completed: false,
            finished: false,
        }
    }

    /// Whether the session answered with an immediate response and expects nothing more.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Handles one message from Envoy, appending the answers to `out` in order.
    pub fn handle(&mut self, msg: ProcessingRequest, out: &mut VecDeque<ProcessingResponse>) {
        if let Some(pc) = &msg.protocol_config {
            self.request_mode = pc.request_body_mode;
            self.response_mode = pc.response_body_mode;
        }
        if let Some(md) = &msg.metadata_context {
            if let Some(ns) = md.filter_metadata.get(SUBSET_NAMESPACE)
                && let Some(v) = ns.fields.get(SUBSET_KEY)
            {
                self.subset = Some(string_list(v));
            }
            if let Some(ns) = md.filter_metadata.get(DESTINATION_NAMESPACE)
                && let Some(v) = ns.fields.get(SERVED_KEY)
            {
                self.served = string_list(v).into_iter().next();
                self.apply_served();
            }
        }
        let result = match msg.request {
            Some(In::RequestHeaders(h)) => self.on_request_headers(h, out),
            Some(In::RequestBody(b)) => self.on_request_body(b, out),
            Some(In::RequestTrailers(_)) => self.on_request_trailers(out),
            Some(In::ResponseHeaders(h)) => {
                self.on_response_headers(h, out);
                Ok(())
            }
            Some(In::ResponseBody(b)) => {
                self.on_response_body(b, out);
                Ok(())
            }
            Some(In::ResponseTrailers(_)) => {
                self.finish_response();
                out.push_back(reply(Out::ResponseTrailers(TrailersResponse::default())));
                Ok(())
            }
            None => Ok(()),
        };
        if let Err(e) = result {
            self.reject(&e, out);
        }
    }

    fn reject(&mut self, e: &RequestError, out: &mut VecDeque<ProcessingResponse>) {
        tracing::debug!(request_id = self.request_id, error = %e, "request answered with an error");
        if let Some(r) = &self.routed
            && let Some(labels) = &r.labels
        {
            self.state
                .metrics()
                .request_error_total
                .get_or_create(&error_labels(labels, e.code.as_str()))
                .inc();
        }
        out.clear();
        out.push_back(e.to_response());
        self.finished = true;
    }

    fn on_request_headers(
        &mut self,
        h: HttpHeaders,
        out: &mut VecDeque<ProcessingResponse>,
    ) -> Result<(), RequestError> {
        if self.phase != Phase::Start {
            return Err(RequestError::new(
                ErrorCode::Internal,
                "request headers arrived twice on one stream",
            ));
        }
        self.read_request_headers(h.headers);
        if h.end_of_stream || self.request_mode == MODE_NONE {
            let mutation = self.route_bodiless()?;
            out.push_back(
                reply(Out::RequestHeaders(HeadersResponse {
                    response: Some(mutation.0),
                }))
                .with_metadata(mutation.1),
            );
            self.phase = Phase::Routed;
        } else {
            if self.request_mode != MODE_FULL_DUPLEX {
                // Buffered/streamed bodies only arrive once the headers are answered; the
                // routing mutation rides on the body answer.
                out.push_back(reply(Out::RequestHeaders(HeadersResponse::default())));
            }
            self.phase = Phase::RequestBody;
        }
        Ok(())
    }

    fn read_request_headers(&mut self, map: Option<HeaderMap>) {
        let Some(map) = map else { return };
        self.headers.reserve(map.headers.len());
        let mut fallback_path = None;
        for hv in map.headers {
            let value = header_value(hv.value, hv.raw_value);
            let key = if hv.key.bytes().any(|b| b.is_ascii_uppercase()) {
                hv.key.to_ascii_lowercase()
            } else {
                hv.key
            };
            match key.as_str() {
                ":path" => self.path.clone_from(&value),
                "x-original-path" | "x-forwarded-path" if fallback_path.is_none() => {
                    fallback_path = Some(value.clone())
                }
                "x-request-id" => self.request_id.clone_from(&value),
                _ => {}
            }
            if let Some(k) = INTERNAL_REQUEST_HEADERS.iter().find(|k| **k == key) {
                self.present_internal.push(k);
                // Never trusted: the value is not kept either.
                continue;
            }
            if key == DESTINATION_KEY {
                continue;
            }
            self.headers.push((key, value));
        }
        if self.path.is_empty() {
            self.path = fallback_path.unwrap_or_else(|| "/v1/completions".to_string());
        }
        if self.request_id.is_empty() {
            self.request_id = new_request_id(&mut rand::rng());
            self.generated_id = true;
            self.headers
                .push(("x-request-id".to_string(), self.request_id.clone()));
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn on_request_body(
        &mut self,
        b: HttpBody,
        out: &mut VecDeque<ProcessingResponse>,
    ) -> Result<(), RequestError> {
        if self.phase != Phase::RequestBody {
            // A body after routing (or before headers) is a proxy bug; pass it on unchanged
            // rather than hang the request.
            out.push_back(reply(Out::RequestBody(BodyResponse::default())));
            return Ok(());
        }
        if self.body.len() + b.body.len() > self.opts.max_request_body_bytes {
            return Err(RequestError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "request body exceeds the picker's limit of {} bytes (--max-request-body-bytes)",
                    self.opts.max_request_body_bytes
                ),
            ));
        }
        if self.body.is_empty() {
            self.body = b.body;
        } else {
            self.body.extend_from_slice(&b.body);
        }
        if b.end_of_stream {
            self.route_with_body(true, out)?;
        } else if self.request_mode != MODE_FULL_DUPLEX && self.request_mode != MODE_BUFFERED {
            // STREAMED / BUFFERED_PARTIAL: Envoy waits for an answer per chunk, and the route
            // is fixed by the first one, so buffer-then-route is not possible here. Hold
            // nothing back: route on the first chunk would pick without the model, so refuse
            // clearly instead.
            return Err(RequestError::new(
                ErrorCode::Internal,
                "the proxy's request_body_mode must be FULL_DUPLEX_STREAMED or BUFFERED for routing on the body",
            ));
        }
        Ok(())
    }

    fn on_request_trailers(
        &mut self,
        out: &mut VecDeque<ProcessingResponse>,
    ) -> Result<(), RequestError> {
        if self.phase == Phase::RequestBody {
            // The body ended without end_of_stream because trailers follow.
            self.route_with_body(false, out)?;
        }
        out.push_back(reply(Out::RequestTrailers(TrailersResponse::default())));
        Ok(())
    }

    /// The mutation that sends the request to `dest` and strips client-supplied internals.
    fn routing_mutation(
        &self,
        (dest, md): (String, Struct),
        content_length: Option<usize>,
    ) -> (CommonResponse, Struct) {
        let mut set = Vec::with_capacity(3);
        set.push(set_header(DESTINATION_KEY, &dest));
        if let Some(len) = content_length.filter(|l| *l > 0) {
            set.push(set_header("content-length", &len.to_string()));
        }
        if self.generated_id {
            set.push(set_header("x-request-id", &self.request_id));
        }
        let common = CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers: set,
                remove_headers: self
                    .present_internal
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            }),
            clear_route_cache: true,
            ..Default::default()
        };
        (common, md)
    }

    fn candidates(&self, loaded: &Loaded) -> Result<Vec<Candidate>, RequestError> {
        let now = Instant::now();
        let cands: Vec<Candidate> = match (&self.subset, self.opts.disable_subset_filter) {
            (Some(subset), false) => {
                let matchers: Vec<SubsetEntry> = subset
                    .iter()
                    .filter_map(|s| SubsetEntry::parse(s))
                    .collect();
                loaded
                    .endpoints
                    .iter()
                    .filter(|e| matchers.iter().any(|m| m.matches(e.endpoint.address)))
                    .map(|e| e.candidate(now))
                    .collect()
            }
            _ => loaded.candidates(now),
        };
        if cands.is_empty() {
            let why = if loaded.endpoints.is_empty() {
                "the pool has no ready endpoints".to_string()
            } else if let Some(subset) = &self.subset {
                format!(
                    "failed to find endpoint candidates for serving the request: the subset hint {subset:?} matches no ready endpoint"
                )
            } else {
                "the pool has no ready endpoints".to_string()
            };
            return Err(RequestError::new(ErrorCode::ServiceUnavailable, why));
        }
        Ok(cands)
    }

    fn loaded(&self) -> Result<Arc<Loaded>, RequestError> {
        self.state.current().ok_or_else(|| {
            RequestError::new(
                ErrorCode::ServiceUnavailable,
                "the picker has no pool configuration yet",
            )
        })
    }

    fn route_bodiless(&mut self) -> Result<(CommonResponse, Struct), RequestError> {
        let loaded = self.loaded()?;
        let cands = self.candidates(&loaded)?;
        let pick = Router::pick_bodiless(&cands, &mut rand::rng()).ok_or_else(|| {
            RequestError::new(
                ErrorCode::ServiceUnavailable,
                "the pool has no ready endpoints",
            )
        })?;
        let mutation = self.routing_mutation(
            loaded.destination_and_metadata(std::slice::from_ref(&pick)),
            None,
        );
        self.routed = Some(Routed {
            loaded,
            request: LlmRequest {
                request_id: self.request_id.clone(),
                ..Default::default()
            },
            scheduled: None,
            labels: None,
            incoming_model: String::new(),
            target_model: String::new(),
            admission: None,
        });
        Ok(mutation)
    }

    fn route_with_body(
        &mut self,
        body_eos: bool,
        out: &mut VecDeque<ProcessingResponse>,
    ) -> Result<(), RequestError> {
        let t0 = Instant::now();
        let loaded = self.loaded()?;
        let metrics = Arc::clone(self.state.metrics());
        let parsed = parse_request(&self.path, &self.body)
            .map_err(|e| RequestError::new(ErrorCode::BadRequest, e.to_string()))?;
        let priority = OBJECTIVE_HEADERS
            .iter()
            .find_map(|h| self.header(h))
            .and_then(|name| loaded.snapshot.objective(name))
            .map(|o| o.priority)
            .unwrap_or(0);
        let incoming = parsed.model.clone();
        let target = if let Some(forced) = self.header(MODEL_REWRITE_HEADER) {
            forced.to_string()
        } else if let Some((rule, t)) =
            crate::rewrite::pick(&loaded.snapshot.rewrites, &incoming, &mut rand::rng())
        {
            metrics
                .rewrite_decisions
                .get_or_create(&RewriteLabels {
                    model_rewrite_name: rule.source.clone(),
                    model_name: incoming.clone(),
                    target_model: t.to_string(),
                })
                .inc();
            t.to_string()
        } else {
            incoming.clone()
        };
        // Resolved once per (model, target, priority): the request's other observations
        // (here and at completion) are plain atomic updates.
        let labels = metrics.model_series(&incoming, &target, priority);
        labels.request_total.inc();
        labels.request_sizes.observe(self.body.len() as f64);

        let body: Bytes = if target != incoming {
            Bytes::from(splice_model(&self.body, parsed.model_span, &target))
        } else {
            Bytes::from(std::mem::take(&mut self.body))
        };
        self.body = Vec::new();
        // The prompt spans refer to the original body; spans after the model shift by the
        // difference between the old and new model strings.
        let new_len = body.len();
        let old_model_len = parsed.model_span.1 - parsed.model_span.0;
        let new_model_len = if target == incoming {
            old_model_len
        } else {
            json_string_len(&target)
        };
        let adjust = |span: (usize, usize)| -> (usize, usize) {
            if span.0 >= parsed.model_span.1 {
                (
                    span.0 + new_model_len - old_model_len,
                    span.1 + new_model_len - old_model_len,
                )
            } else {
                span
            }
        };
        let prompt = {
            let (ps, pe) = adjust(parsed.prompt_span);
            let p = body.slice(ps.min(new_len)..pe.min(new_len));
            match parsed.system_span.map(adjust) {
                Some((ss, se)) => {
                    let mut joined = Vec::with_capacity(se - ss + p.len());
                    joined.extend_from_slice(body.get(ss..se).unwrap_or_default());
                    joined.extend_from_slice(&p);
                    Bytes::from(joined)
                }
                None => p,
            }
        };
        let request = LlmRequest {
            request_id: self.request_id.clone(),
            target_model: target.clone(),
            requested_model: incoming.clone(),
            prompt,
            cache_salt: parsed.cache_salt.clone(),
            headers: std::mem::take(&mut self.headers),
            priority,
            prompt_tokens: u32::try_from(parsed.estimated_prompt_tokens()).unwrap_or(u32::MAX),
            stream: parsed.stream,
            prefetched_predictions: None,
        };
        let cands = match self.candidates(&loaded) {
            Ok(c) => c,
            Err(e) => {
                metrics
                    .request_error_total
                    .get_or_create(&error_labels(&labels, e.code.as_str()))
                    .inc();
                return Err(e);
            }
        };
        // A profile handler that does its own admission (the SLO profile: its scorer sheds
        // what no endpoint can serve in time) bypasses the pool-wide saturation gate, as it
        // bypasses the legacy saturation check: the request is scheduled at once, without
        // a flow-control permit, instead of queueing behind saturation it does not obey.
        let flow_request = loaded
            .flow
            .as_ref()
            .filter(|_| !loaded.router.skip_saturation_detection(&request))
            .map(|fc| {
                fc.request_from_headers(priority, body.len() as u64, |name| {
                    request
                        .headers
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                })
            });
        let prepared = Prepared {
            loaded,
            request,
            labels,
            incoming,
            target,
            body,
            body_eos,
            t0,
        };
        match (prepared.loaded.flow.clone(), flow_request) {
            (Some(fc), Some(fr)) => {
                // Wait for flow control; SessionStream polls the admission before reading
                // anything else from Envoy. Dropping the session leaves the queue.
                self.pending = Some(Pending {
                    admission: fc.admit_owned(fr),
                    prepared,
                });
                Ok(())
            }
            _ => self.dispatch(prepared, Some(cands), None, out),
        }
    }

    /// Whether the request waits for flow control.
    pub fn is_waiting_for_admission(&self) -> bool {
        self.pending.is_some()
    }

    /// Polls a pending flow-control admission: once it resolves, schedules the request
    /// (or answers with the drop status and reason) and appends the answers to `out`.
    /// `Ready` at once when nothing is pending.
    pub fn poll_admission(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<ProcessingResponse>,
    ) -> Poll<()> {
        let Some(pending) = &mut self.pending else {
            return Poll::Ready(());
        };
        let result = match Pin::new(&mut pending.admission).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        let Some(Pending { prepared, .. }) = self.pending.take() else {
            return Poll::Ready(());
        };
        let result = match result {
            Ok(guard) => self.dispatch(prepared, None, Some(guard), out),
            Err(outcome) => {
                let status = outcome.http_status();
                let code = ErrorCode::from_http_status(status);
                self.state
                    .metrics()
                    .request_error_total
                    .get_or_create(&error_labels(&prepared.labels, code.as_str()))
                    .inc();
                Err(RequestError::new(code, outcome.to_string())
                    .with_header(DROPPED_REASON_HEADER, outcome.reason()))
            }
        };
        if let Err(e) = result {
            self.reject(&e, out);
        }
        Poll::Ready(())
    }

    /// Schedules a prepared request and answers Envoy with the routing mutation. `cands` are
    /// recomputed when the request waited in flow control (metrics moved meanwhile).
    fn dispatch(
        &mut self,
        prepared: Prepared,
        cands: Option<Vec<Candidate>>,
        admission: Option<AdmissionGuard>,
        out: &mut VecDeque<ProcessingResponse>,
    ) -> Result<(), RequestError> {
        let metrics = Arc::clone(self.state.metrics());
        let cands = match cands {
            Some(c) => c,
            None => match self.candidates(&prepared.loaded) {
                Ok(c) => c,
                Err(e) => {
                    metrics
                        .request_error_total
                        .get_or_create(&error_labels(&prepared.labels, e.code.as_str()))
                        .inc();
                    return Err(e);
                }
            },
        };
        let sched_start = Instant::now();
        let loaded = &prepared.loaded;
        let decided = loaded
            .router
            .decide(&prepared.request, &cands, loaded.flow.is_none());
        metrics
            .scheduler_e2e
            .observe(sched_start.elapsed().as_secs_f64());
        if let Ok(first) = &decided
            && prepared.request.prefetched_predictions.is_none()
            && let Some(deferred) = first
                .cycle
                .state
                .get::<DeferredPrediction>(DEFERRED_PREDICTION_KEY)
                .cloned()
            && let Ok(fallback) = decided
        {
            let DeferredPrediction {
                predictor,
                endpoints,
                features,
            } = deferred;
            self.predicting = Some(Predicting {
                prepared,
                cands,
                admission,
                fallback,
                endpoints,
                answer: Box::pin(async move { predictor.predict_batch(&features).await }),
                asked_at: Instant::now(),
            });
            return Ok(());
        }
        self.finish_dispatch(prepared, admission, decided, out)
    }

    /// Polls a pending remote latency prediction; once it resolves, decides again with the
    /// predictions (or keeps the composite decision if the predictor failed) and answers.
    /// `Ready` at once when nothing is pending.
    pub fn poll_prediction(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<ProcessingResponse>,
    ) -> Poll<()> {
        let Some(p) = &mut self.predicting else {
            return Poll::Ready(());
        };
        let answer = match p.answer.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(a) => a,
        };
        let Some(Predicting {
            mut prepared,
            cands,
            admission,
            fallback,
            endpoints,
            asked_at,
            ..
        }) = self.predicting.take()
        else {
            return Poll::Ready(());
        };
        let decided = match answer {
            Ok(predictions) if predictions.len() == endpoints.len() => {
                // The scorer times only in-process predictions; a remote answer's time is
                // the round trip the request waited for.
                self.state.slo().metrics().observe_prediction_duration(
                    &SloLabels::for_request(&prepared.request),
                    asked_at.elapsed().as_secs_f64(),
                );
                prepared.request.prefetched_predictions =
                    Some(Arc::new(PrefetchedPredictions::new(endpoints, predictions)));
                let loaded = Arc::clone(&prepared.loaded);
                loaded
                    .router
                    .decide(&prepared.request, &cands, loaded.flow.is_none())
            }
            Ok(predictions) => {
                tracing::debug!(
                    rows = predictions.len(),
                    endpoints = endpoints.len(),
                    "remote latency predictor answered the wrong number of rows; keeping the composite decision"
                );
                Ok(fallback)
            }
            Err(e) => {
                tracing::debug!(error = %e, "remote latency prediction failed; keeping the composite decision");
                Ok(fallback)
            }
        };
        if let Err(e) = self.finish_dispatch(prepared, admission, decided, out) {
            self.reject(&e, out);
        }
        Poll::Ready(())
    }

    /// Commits a decision and answers Envoy with the routing mutation.
    fn finish_dispatch(
        &mut self,
        prepared: Prepared,
        admission: Option<AdmissionGuard>,
        decided: Result<Scheduled, ScheduleError>,
        out: &mut VecDeque<ProcessingResponse>,
    ) -> Result<(), RequestError> {
        let Prepared {
            loaded,
            request,
            labels,
            incoming,
            target,
            body,
            body_eos,
            t0,
        } = prepared;
        let metrics = Arc::clone(self.state.metrics());
        let scheduled = match decided {
            Ok(s) => s,
            Err(e) => {
                let code = ErrorCode::from_http_status(e.http_status());
                metrics
                    .scheduler_attempts
                    .get_or_create(&AttemptLabels {
                        status: "failure".into(),
                        target_model_name: target.clone(),
                        pod_name: String::new(),
                        namespace: String::new(),
                        port: String::new(),
                    })
                    .inc();
                metrics
                    .request_error_total
                    .get_or_create(&error_labels(&labels, code.as_str()))
                    .inc();
                return Err(RequestError::new(code, e.to_string()));
            }
        };
        let mut scheduled = scheduled;
        loaded.router.commit(&request, &mut scheduled);
        let dest = loaded.destination_and_metadata(&scheduled.result.targets);
        if let Some(t) = scheduled.result.targets.first() {
            labels
                .attempt_success(
                    &metrics,
                    &t.endpoint.key.pod,
                    &t.endpoint.key.namespace,
                    t.endpoint.address.port(),
                )
                .inc();
            if t.metrics.is_some() {
                metrics
                    .metrics_age_at_decision
                    .observe(t.metrics_age.as_secs_f64());
            }
        }
        tracing::debug!(
            request_id = request.request_id,
            destination = dest.0,
            "routed"
        );
        let (common, md) = self.routing_mutation(dest, Some(body.len()));
        if self.request_mode == MODE_FULL_DUPLEX {
            out.push_back(
                reply(Out::RequestHeaders(HeadersResponse {
                    response: Some(common),
                }))
                .with_metadata(md),
            );
            push_streamed_body(out, &body, body_eos, Out::RequestBody);
        } else {
            let mut common = common;
            if target != incoming {
                common.body_mutation = Some(BodyMutation {
                    mutation: Some(body_mutation::Mutation::Body(body.to_vec())),
                });
            }
            out.push_back(
                reply(Out::RequestBody(BodyResponse {
                    response: Some(common),
                }))
                .with_metadata(md),
            );
        }
        labels.running_requests.inc();
        self.routed = Some(Routed {
            loaded,
            request,
            scheduled: Some(scheduled),
            labels: Some(labels),
            incoming_model: incoming,
            target_model: target,
            admission,
        });
        self.phase = Phase::Routed;
        metrics
            .decision_duration
            .observe(t0.elapsed().as_secs_f64());
        Ok(())
    }

    fn on_response_headers(&mut self, h: HttpHeaders, out: &mut VecDeque<ProcessingResponse>) {
        let mut status = None;
        let mut pairs = Vec::new();
        if let Some(map) = h.headers {
            pairs.reserve_exact(map.headers.len());
            for hv in map.headers {
                let value = header_value(hv.value, hv.raw_value);
                match hv.key.as_str() {
                    ":status" | "status" => status = value.trim().parse::<u16>().ok(),
                    "content-type" if value.contains("text/event-stream") => {
                        self.resp.streaming = true
                    }
                    _ => {}
                }
                pairs.push((hv.key, value));
            }
        }
        self.resp.status = status;
        tracing::debug!(request_id = self.request_id, status, "response headers");
        let mut set = Vec::new();
        if let Some(r) = &mut self.routed
            && let Some(s) = &mut r.scheduled
        {
            for (k, v) in r.loaded.router.response_headers(&r.request, s, &pairs) {
                set.push(set_header(&k, &v));
            }
        }
        let response = (!set.is_empty()).then(|| CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers: set,
                remove_headers: Vec::new(),
            }),
            ..Default::default()
        });
        out.push_back(reply(Out::ResponseHeaders(HeadersResponse { response })));
        if h.end_of_stream {
            self.resp.ended = true;
            self.finish_response();
        }
    }

    fn on_response_body(&mut self, b: HttpBody, out: &mut VecDeque<ProcessingResponse>) {
        let eos = b.end_of_stream;
        let data = b.body;
        if self.resp.first_byte.is_none() && !data.is_empty() {
            self.resp.first_byte = Some(Instant::now());
        }
        self.resp.bytes += data.len() as u64;
        if let Some(r) = &mut self.routed
            && let Some(s) = &mut r.scheduled
        {
            r.loaded.router.response_chunk(
                &r.request,
                s,
                ResponseChunk {
                    data: &data,
                    end_of_stream: eos,
                },
            );
        }
        let (incoming, target) = match &self.routed {
            Some(r) => (r.incoming_model.as_str(), r.target_model.as_str()),
            None => ("", ""),
        };
        if self.resp.streaming {
            self.resp.sse.feed(&data);
            if self.response_mode == MODE_FULL_DUPLEX {
                let data = rewrite_model_back(&data, target, incoming).unwrap_or(data);
                out.push_back(reply(Out::ResponseBody(streamed(data, eos))));
            } else {
                // STREAMED / BUFFERED: lengths are fixed by then; pass the bytes unchanged.
                out.push_back(reply(Out::ResponseBody(BodyResponse::default())));
            }
        } else if self.response_mode == MODE_FULL_DUPLEX && !self.resp.passthrough {
            if self.resp.buffer.len() + data.len() > self.opts.max_response_buffer_bytes {
                // Too large to hold: forward what is held and stream the rest untouched.
                self.resp.passthrough = true;
                let mut held = std::mem::take(&mut self.resp.buffer);
                held.extend_from_slice(&data);
                push_streamed_body(out, &held, eos, Out::ResponseBody);
            } else if eos {
                // A body in one message (the usual case) is used as it came, not copied.
                let body = if self.resp.buffer.is_empty() {
                    data
                } else {
                    let mut held = std::mem::take(&mut self.resp.buffer);
                    held.extend_from_slice(&data);
                    held
                };
                self.resp.usage = usage_from_json(&body);
                let body = rewrite_model_back(&body, target, incoming).unwrap_or(body);
                if body.len() <= BODY_CHUNK {
                    out.push_back(reply(Out::ResponseBody(streamed(body, true))));
                } else {
                    push_streamed_body(out, &body, true, Out::ResponseBody);
                }
            } else {
                self.resp.buffer.extend_from_slice(&data);
            }
        } else if self.response_mode == MODE_FULL_DUPLEX {
            out.push_back(reply(Out::ResponseBody(streamed(data, eos))));
        } else if self.response_mode == MODE_BUFFERED && eos {
            // The whole body in one message, its headers still held: the rewritten body can
            // carry a matching Content-Length (Envoy rejects a mismatch with a 500).
            self.resp.usage = usage_from_json(&data);
            let common = match rewrite_model_back(&data, target, incoming) {
                Some(body) => CommonResponse {
                    header_mutation: Some(HeaderMutation {
                        set_headers: vec![set_header("content-length", &body.len().to_string())],
                        remove_headers: Vec::new(),
                    }),
                    body_mutation: Some(BodyMutation {
                        mutation: Some(body_mutation::Mutation::Body(body)),
                    }),
                    ..Default::default()
                },
                None => CommonResponse::default(),
            };
            out.push_back(reply(Out::ResponseBody(BodyResponse {
                response: Some(common),
            })));
        } else {
            // STREAMED: the headers (and any Content-Length) are gone; pass bytes unchanged.
            out.push_back(reply(Out::ResponseBody(BodyResponse::default())));
        }
        if eos {
            self.resp.ended = true;
            self.finish_response();
        }
    }

    /// The response is over (end of stream, trailers, or the stream closing).
    fn finish_response(&mut self) {
        let outcome = match self.resp.status {
            Some(s) if s >= 400 => Outcome::Failed {
                reason: format!("model server answered HTTP {s}"),
            },
            Some(_) if self.resp.ended || self.response_mode == MODE_NONE => Outcome::Success,
            Some(_) => Outcome::ClientDisconnected,
            None => Outcome::ClientDisconnected,
        };
        self.complete(outcome);
    }

    /// The inbound stream ended.
    fn end_of_stream(&mut self) {
        tracing::debug!(
            request_id = self.request_id,
            phase = ?self.phase,
            completed = self.completed,
            "ext_proc stream ended"
        );
        self.finish_response();
    }

    fn complete(&mut self, outcome: Outcome) {
        if self.completed {
            return;
        }
        self.completed = true;
        let Some(r) = &mut self.routed else { return };
        if self.resp.streaming {
            self.resp.sse.finish();
            self.resp.usage = self.resp.sse.usage();
        }
        if let Some(s) = &mut r.scheduled {
            r.loaded.router.complete(&r.request, s, outcome.clone());
        }
        let held_permit = r.admission.take().is_some();
        if (held_permit || r.scheduled.is_some())
            && let Some(fc) = &r.loaded.flow
        {
            // The endpoint's in-flight count dropped (and the permit is back, unless the
            // request bypassed flow control): the next queued request may go.
            fc.capacity_changed();
        }
        let Some(labels) = &r.labels else { return };
        let m = self.state.metrics();
        labels.running_requests.dec();
        match &outcome {
            Outcome::Success => {
                let elapsed = self.started.elapsed();
                labels.request_duration.observe(elapsed.as_secs_f64());
                labels.response_sizes.observe(self.resp.bytes as f64);
                if let Some(u) = self.resp.usage {
                    labels.input_tokens.observe(u.prompt_tokens as f64);
                    labels.output_tokens.observe(u.completion_tokens as f64);
                    labels.prompt_cached_tokens.observe(u.cached_tokens as f64);
                    if u.completion_tokens > 0 {
                        labels
                            .normalized_tpot
                            .observe(elapsed.as_secs_f64() / u.completion_tokens as f64);
                    }
                }
            }
            Outcome::Failed { .. } => {
                m.request_error_total
                    .get_or_create(&error_labels(labels, "ModelServerError"))
                    .inc();
            }
            Outcome::ClientDisconnected => {}
        }
    }

    /// Envoy reported the endpoint that served the request: when that is another endpoint of
    /// this snapshot than the one the request counts on (a retry on a fallback), the
    /// request's in-flight accounting moves there. The value is used for nothing else, and
    /// one that is not `ip:port` of a pool endpoint is ignored.
    fn apply_served(&mut self) {
        let Some(served) = self.served.as_deref() else {
            return;
        };
        let Some(r) = &mut self.routed else { return };
        let Some(s) = &mut r.scheduled else { return };
        let Ok(addr) = served.trim().parse::<SocketAddr>() else {
            return;
        };
        if s.accounted_on().map(|c| c.endpoint.address) == Some(addr) {
            return;
        }
        let Some(ep) = r.loaded.endpoint_at(addr) else {
            return;
        };
        let candidate = ep.candidate(Instant::now());
        if r.loaded.router.served_by(&r.request, s, candidate) {
            self.state.metrics().fallback_served.inc();
            tracing::debug!(
                request_id = r.request.request_id,
                served,
                "request served by a fallback endpoint; its in-flight counts moved there"
            );
        }
    }

    /// Time from the routing decision to the first response byte, when known.
    pub fn time_to_first_byte(&self) -> Option<Duration> {
        self.resp
            .first_byte
            .map(|t| t.saturating_duration_since(self.started))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.finish_response();
    }
}

/// A header's value as Envoy sends it: `raw_value` when set (taken over without copying
/// when it is UTF-8), else `value`.
fn header_value(value: String, raw_value: Vec<u8>) -> String {
    if raw_value.is_empty() {
        value
    } else {
        String::from_utf8(raw_value)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

fn error_labels(series: &ModelSeries, code: &str) -> ErrorLabels {
    ErrorLabels {
        model_name: series.labels.model_name.clone(),
        target_model_name: series.labels.target_model_name.clone(),
        error_code: code.to_string(),
    }
}

fn json_string_len(s: &str) -> usize {
    serde_json::to_string(s)
        .map(|q| q.len())
        .unwrap_or(s.len() + 2)
}

trait WithMetadata {
    fn with_metadata(self, md: Struct) -> Self;
}

impl WithMetadata for ProcessingResponse {
    fn with_metadata(mut self, md: Struct) -> Self {
        self.dynamic_metadata = Some(md);
        self
    }
}

/// Wraps one answer in the message the stream carries (public for the bench's floor
/// processor, which must answer Envoy with the same messages the picker sends).
pub fn reply(r: Out) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

/// A body chunk passed back in `FULL_DUPLEX_STREAMED` mode.
pub fn streamed(body: Vec<u8>, end_of_stream: bool) -> BodyResponse {
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body,
                        end_of_stream,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        }),
    }
}

/// Sends `body` back in `BODY_CHUNK`-sized streamed answers (at least one, so that an empty
/// body still carries `end_of_stream`).
fn push_streamed_body(
    out: &mut VecDeque<ProcessingResponse>,
    body: &[u8],
    eos: bool,
    wrap: fn(BodyResponse) -> Out,
) {
    if body.is_empty() {
        out.push_back(reply(wrap(streamed(Vec::new(), eos))));
        return;
    }
    let n = body.len().div_ceil(BODY_CHUNK);
    for (i, chunk) in body.chunks(BODY_CHUNK).enumerate() {
        out.push_back(reply(wrap(streamed(chunk.to_vec(), eos && i + 1 == n))));
    }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": dest}}`: the dynamic metadata the
/// routing answer carries (public so that the bench's floor processor can send the very
/// same bytes when it measures what the metadata costs Envoy).
pub fn destination_metadata(dest: &str) -> Struct {
    let mut inner = Struct::default();
    inner.fields.insert(
        DESTINATION_KEY.to_string(),
        Value {
            kind: Some(Kind::StringValue(dest.to_string())),
        },
    );
    let mut outer = Struct::default();
    outer.fields.insert(
        DESTINATION_NAMESPACE.to_string(),
        Value {
            kind: Some(Kind::StructValue(inner)),
        },
    );
    outer
}

/// A metadata value as a list of strings: a list of strings, or one comma-separated string.
fn string_list(v: &Value) -> Vec<String> {
    match &v.kind {
        Some(Kind::StringValue(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        Some(Kind::ListValue(ListValue { values })) => values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.trim().to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// One subset-hint entry: `ip:port` matches exactly; a bare IP matches any port of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubsetEntry {
    Exact(SocketAddr),
    Ip(IpAddr),
}

impl SubsetEntry {
    fn parse(s: &str) -> Option<SubsetEntry> {
        let s = s.trim();
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Some(SubsetEntry::Exact(sa));
        }
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
            .map(SubsetEntry::Ip)
    }

    fn matches(&self, addr: SocketAddr) -> bool {
        match self {
            SubsetEntry::Exact(sa) => *sa == addr,
            SubsetEntry::Ip(ip) => *ip == addr.ip(),
        }
    }
}

/// A random UUID (version 4) for requests that arrive without `x-request-id`.
pub fn new_request_id(rng: &mut impl Rng) -> String {
    let v: u128 = rng.random();
    let v = (v & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
#[path = "extproc_tests.rs"]
mod tests;
