//! `session-affinity-scorer` (as in llm-d) and `header-based-testing-filter` (the
//! conformance test hook).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sluice_core::EndpointKey;

use crate::cycle::Cycle;
use crate::plugin::{Filter, Plugin, ResponseHooks, Scorer, ScorerCategory, TypedName};
use crate::plugins::scorers::NoParams;
use crate::registry::PluginInit;
use crate::types::{Candidate, LlmRequest, PluginError, SchedulingResult};

/// The request and response header carrying the session's endpoint.
pub const SESSION_TOKEN_HEADER: &str = "x-session-token";

/// The conformance header naming the endpoints a request must go to.
pub const TEST_ENDPOINT_SELECTION_HEADER: &str = "test-epp-endpoint-selection";

/// Scores 1 the endpoint named by the request's `x-session-token` (base64 of
/// `namespace/pod-rank-N`) and 0 the others; sets the token on every response so that the
/// client's next request returns to the same endpoint.
#[derive(Debug)]
pub struct SessionAffinityScorer {
    name: TypedName,
}

impl SessionAffinityScorer {
    /// A scorer with this name.
    pub fn new(name: TypedName) -> Self {
        SessionAffinityScorer { name }
    }

    pub(crate) fn factory(init: &PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> {
        let _: NoParams = init
            .parse()
            .map_err(|e| format!("{e}; this plugin takes no parameters"))?;
        Ok(Arc::new(SessionAffinityScorer::new(
            init.typed_name.clone(),
        )))
    }

    /// The token for an endpoint.
    pub fn token_for(key: &EndpointKey) -> String {
        STANDARD.encode(key.to_string())
    }
}

/// `namespace/pod-rank-N` (or `namespace/pod`, meaning rank 0) back into its parts.
fn parse_token(token: &str) -> Option<(String, String, u32)> {
    let raw = STANDARD.decode(token.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (ns, name) = s.split_once('/')?;
    match name.rsplit_once("-rank-") {
        Some((pod, rank)) if rank.parse::<u32>().is_ok() => {
            Some((ns.to_owned(), pod.to_owned(), rank.parse().ok()?))
        }
        _ => Some((ns.to_owned(), name.to_owned(), 0)),
    }
}

impl Plugin for SessionAffinityScorer {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_scorer(self: Arc<Self>) -> Option<Arc<dyn Scorer>> {
        Some(self)
    }
    fn as_response_hooks(self: Arc<Self>) -> Option<Arc<dyn ResponseHooks>> {
        Some(self)
    }
}

impl Scorer for SessionAffinityScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Affinity
    }

    fn score(
        &self,
        _: &mut Cycle,
        request: &LlmRequest,
        candidates: &[Candidate],
        endpoints: &[usize],
        out: &mut [f64],
    ) -> Result<(), PluginError> {
        let Some((ns, pod, rank)) = request.header(SESSION_TOKEN_HEADER).and_then(parse_token)
        else {
            return Ok(());
        };
        for (o, &i) in out.iter_mut().zip(endpoints) {
            let k = &candidates[i].endpoint.key;
            if *k.namespace == *ns && *k.pod == *pod && k.rank == rank {
                *o = 1.0;
            }
        }
        Ok(())
    }
}

impl ResponseHooks for SessionAffinityScorer {
    fn on_response_headers(
        &self,
        _: &mut Cycle,
        _: &LlmRequest,
        result: &SchedulingResult,
        _: &[(String, String)],
        add_headers: &mut Vec<(String, String)>,
    ) {
        if let Some(t) = result.targets.first() {
            add_headers.push((
                SESSION_TOKEN_HEADER.to_owned(),
                Self::token_for(&t.endpoint.key),
            ));
        }
    }
}

/// Keeps only the endpoints named in `test-epp-endpoint-selection` (comma list of `ip` or
/// `ip:port`, IPv6 bracketed), in header order, at most one per IP. Without the header it
/// keeps nothing, so a conformance request without it fails scheduling, as upstream's does.
#[derive(Debug)]
pub struct HeaderBasedTestingFilter {
    name: TypedName,
}

impl HeaderBasedTestingFilter {
    /// A filter with this name.
    pub fn new(name: TypedName) -> Self {
        HeaderBasedTestingFilter { name }
    }

    pub(crate) fn factory(init: &PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> {
        let _: NoParams = init
            .parse()
            .map_err(|e| format!("{e}; this plugin takes no parameters"))?;
        Ok(Arc::new(HeaderBasedTestingFilter::new(
            init.typed_name.clone(),
        )))
    }
}

impl Plugin for HeaderBasedTestingFilter {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_filter(self: Arc<Self>) -> Option<Arc<dyn Filter>> {
        Some(self)
    }
}

impl Filter for HeaderBasedTestingFilter {
    fn filter(
        &self,
        _: &mut Cycle,
        request: &LlmRequest,
        candidates: &[Candidate],
        endpoints: &mut Vec<usize>,
    ) -> Result<(), PluginError> {
        let value = request.header(TEST_ENDPOINT_SELECTION_HEADER).unwrap_or("");
        let mut selected: Vec<usize> = Vec::new();
        let mut ips: Vec<IpAddr> = Vec::new();
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let found = if let Ok(addr) = item.parse::<SocketAddr>() {
                endpoints
                    .iter()
                    .copied()
                    .find(|&i| candidates[i].endpoint.address == addr)
            } else if let Ok(ip) = item
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            {
                endpoints
                    .iter()
                    .copied()
                    .find(|&i| candidates[i].endpoint.address.ip() == ip)
            } else {
                None
            };
            if let Some(i) = found {
                let ip = candidates[i].endpoint.address.ip();
                if !ips.contains(&ip) {
                    ips.push(ip);
                    selected.push(i);
                }
            }
        }
        *endpoints = selected;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_tokens_round_trip() {
        let k = EndpointKey {
            namespace: "ns".into(),
            pod: "vllm-0".into(),
            rank: 2,
        };
        let t = SessionAffinityScorer::token_for(&k);
        assert_eq!(
            parse_token(&t),
            Some(("ns".to_owned(), "vllm-0".to_owned(), 2))
        );
        assert_eq!(
            parse_token(&STANDARD.encode("ns/pod")),
            Some(("ns".to_owned(), "pod".to_owned(), 0))
        );
        assert_eq!(parse_token("%%%"), None);
    }
}
