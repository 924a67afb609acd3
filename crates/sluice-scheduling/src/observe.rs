//! Hooks through which the picker exports the scheduler's metrics (upstream's
//! `inference_extension_plugin_duration_seconds`, `scheduler_e2e_duration_seconds` and the
//! prefix indexer hit ratio / hit bytes) without this crate depending on a metrics library.

use std::fmt;
use std::time::Duration;

/// Where a plugin was called, with upstream's `extension_point` label values where upstream
/// has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExtensionPoint {
    /// A data producer (upstream `PrepareData`).
    PrepareData,
    /// An admitter (llm-d `Admitter`).
    Admitter,
    /// The profile handler choosing profiles.
    ProfilePicker,
    /// A filter.
    Filter,
    /// A scorer.
    Scorer,
    /// A picker.
    Picker,
    /// The profile handler choosing the primary result.
    ProcessProfilesResults,
    /// A PreRequest hook.
    PreRequest,
    /// A response-headers hook.
    ResponseReceived,
    /// A response-chunk hook.
    ResponseStreaming,
    /// A completion hook (sluice only; upstream folds it into the last chunk).
    ResponseComplete,
}

impl ExtensionPoint {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtensionPoint::PrepareData => "PrepareData",
            ExtensionPoint::Admitter => "Admitter",
            ExtensionPoint::ProfilePicker => "ProfilePicker",
            ExtensionPoint::Filter => "Filter",
            ExtensionPoint::Scorer => "Scorer",
            ExtensionPoint::Picker => "Picker",
            ExtensionPoint::ProcessProfilesResults => "ProcessProfilesResults",
            ExtensionPoint::PreRequest => "PreRequest",
            ExtensionPoint::ResponseReceived => "ResponseReceived",
            ExtensionPoint::ResponseStreaming => "ResponseStreaming",
            ExtensionPoint::ResponseComplete => "ResponseComplete",
        }
    }
}

impl fmt::Display for ExtensionPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Receives timings and prefix-cache outcomes. Every method defaults to doing nothing; without
/// an observer the scheduler does not read the clock for timings at all.
pub trait SchedulingObserver: Send + Sync + fmt::Debug {
    /// One plugin call took `elapsed`.
    fn plugin_duration(
        &self,
        _point: ExtensionPoint,
        _plugin_type: &str,
        _plugin_name: &str,
        _elapsed: Duration,
    ) {
    }

    /// One `schedule` call took `elapsed` (upstream's scheduler end-to-end duration).
    fn schedule_duration(&self, _elapsed: Duration) {}

    /// The picked endpoint held `matched_blocks` of the request's `total_blocks` prefix blocks
    /// (hit ratio = matched / total; hit bytes = matched × block size × 4). Reported once per
    /// scheduled request whose prompt spans at least one block.
    fn prefix_match(
        &self,
        _matched_blocks: usize,
        _total_blocks: usize,
        _block_size_tokens: usize,
    ) {
    }
}
