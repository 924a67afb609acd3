//! `predicted-latency-profile-handler` (alias `slo-aware-profile-handler`): runs the SLO
//! profile for requests that use predicted-latency routing and the default profile for those
//! that opt out, and tells the picker to skip saturation-based admission for the former
//! (the SLO scorer sheds by predicted latency instead).

use std::sync::Arc;

use serde::Deserialize;

use super::headers::opted_out;
use crate::cycle::Cycle;
use crate::plugin::{Plugin, ProfileHandler, ProfileRuns, TypedName};
use crate::registry::PluginInit;
use crate::types::{LlmRequest, PluginError};

/// Parameters: which configured profiles play which part.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HandlerParams {
    /// The predicted-latency profile (prefix scorer at weight 0, SLO scorer, weighted
    /// random picker).
    pub slo_profile: String,
    /// The profile for opted-out requests, and the fallback when the SLO profile's filters
    /// leave nothing.
    pub default_profile: String,
    /// Legacy upstream configs declare a `prefix` profile that ran first; it still runs
    /// first when present (prefix data is produced before any profile anyway).
    pub prefix_profile: String,
}

impl Default for HandlerParams {
    fn default() -> Self {
        HandlerParams {
            slo_profile: "slo".into(),
            default_profile: "default".into(),
            prefix_profile: "prefix".into(),
        }
    }
}

/// The profile handler.
#[derive(Debug)]
pub struct PredictedLatencyProfileHandler {
    name: TypedName,
    params: HandlerParams,
}

impl PredictedLatencyProfileHandler {
    /// A handler with these profile names.
    pub fn new(name: TypedName, params: HandlerParams) -> Self {
        PredictedLatencyProfileHandler { name, params }
    }

    pub(crate) fn factory(init: &PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> {
        let p: HandlerParams = init.parse().map_err(|e| {
            format!("{e}; expected {{sloProfile: string, defaultProfile: string, prefixProfile: string}}")
        })?;
        if p.slo_profile.is_empty() {
            return Err(
                "sloProfile is empty; expected the name of the predicted-latency profile".into(),
            );
        }
        Ok(Arc::new(PredictedLatencyProfileHandler::new(
            init.typed_name.clone(),
            p,
        )))
    }
}

impl Plugin for PredictedLatencyProfileHandler {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_profile_handler(self: Arc<Self>) -> Option<Arc<dyn ProfileHandler>> {
        Some(self)
    }
}

fn ran(runs: &ProfileRuns<'_>, i: usize) -> bool {
    runs.results.get(i).is_some_and(Option::is_some)
}

fn ok(runs: &ProfileRuns<'_>, i: usize) -> bool {
    matches!(runs.results.get(i), Some(Some(Ok(_))))
}

impl ProfileHandler for PredictedLatencyProfileHandler {
    fn pick_profiles(
        &self,
        _cycle: &mut Cycle,
        request: &LlmRequest,
        runs: &ProfileRuns<'_>,
    ) -> Vec<usize> {
        let slo = runs.index_of(&self.params.slo_profile);
        let default = runs.index_of(&self.params.default_profile);
        let prefix = runs.index_of(&self.params.prefix_profile);
        if opted_out(request) {
            // Without a default profile the SLO profile is all there is.
            return match default.or(slo) {
                Some(i) if !ran(runs, i) => vec![i],
                _ => Vec::new(),
            };
        }
        if let Some(p) = prefix
            && !ran(runs, p)
        {
            return vec![p];
        }
        match slo {
            Some(s) if !ran(runs, s) => vec![s],
            // The SLO profile failed (its filters removed everything): try the default one.
            Some(s) if !ok(runs, s) => match default {
                Some(d) if !ran(runs, d) => vec![d],
                _ => Vec::new(),
            },
            None => match default {
                Some(d) if !ran(runs, d) => vec![d],
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    }

    fn process_results(
        &self,
        _cycle: &mut Cycle,
        request: &LlmRequest,
        runs: &ProfileRuns<'_>,
    ) -> Result<usize, PluginError> {
        let slo = runs.index_of(&self.params.slo_profile);
        let default = runs.index_of(&self.params.default_profile);
        let order = if opted_out(request) {
            [default, slo]
        } else {
            [slo, default]
        };
        if let Some(i) = order.into_iter().flatten().find(|&i| ok(runs, i)) {
            return Ok(i);
        }
        let reasons: Vec<String> = runs
            .results
            .iter()
            .flatten()
            .filter_map(|r| r.as_ref().err())
            .map(|f| format!("profile {:?}: {}", &*f.profile, f.reason))
            .collect();
        Err(PluginError::Internal(if reasons.is_empty() {
            format!(
                "neither profile {:?} nor {:?} is configured; expected them under schedulingProfiles (or set sloProfile/defaultProfile)",
                self.params.slo_profile, self.params.default_profile
            )
        } else {
            reasons.join("; ")
        }))
    }

    fn skip_saturation_detection(&self, request: &LlmRequest) -> bool {
        !opted_out(request)
    }
}
