//! `single-profile-handler`.

use crate::cycle::Cycle;
use crate::plugin::{Plugin, ProfileHandler, ProfileRuns, TypedName};
use crate::types::{LlmRequest, PluginError};
use std::sync::Arc;

/// Runs every profile once (there must be exactly one) and makes it primary.
#[derive(Debug)]
pub struct SingleProfileHandler {
    name: TypedName,
}

impl SingleProfileHandler {
    /// A handler with this name.
    pub fn new(name: TypedName) -> Self {
        SingleProfileHandler { name }
    }
}

impl Plugin for SingleProfileHandler {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_profile_handler(self: Arc<Self>) -> Option<Arc<dyn ProfileHandler>> {
        Some(self)
    }
}

impl ProfileHandler for SingleProfileHandler {
    fn pick_profiles(
        &self,
        _cycle: &mut Cycle,
        _request: &LlmRequest,
        runs: &ProfileRuns<'_>,
    ) -> Vec<usize> {
        // All profiles on the first call, none afterwards.
        if runs.results.iter().any(Option::is_some) {
            Vec::new()
        } else {
            (0..runs.names.len()).collect()
        }
    }

    fn process_results(
        &self,
        _cycle: &mut Cycle,
        _request: &LlmRequest,
        runs: &ProfileRuns<'_>,
    ) -> Result<usize, PluginError> {
        if runs.names.len() != 1 {
            return Err(PluginError::Internal(format!(
                "single-profile-handler needs exactly one profile, found {}",
                runs.names.len()
            )));
        }
        match runs.results.first() {
            Some(Some(Ok(_))) => Ok(0),
            Some(Some(Err(f))) => Err(PluginError::Internal(f.reason.clone())),
            _ => Err(PluginError::Internal("the profile did not run".to_owned())),
        }
    }
}
