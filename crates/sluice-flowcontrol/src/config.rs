//! `FlowControlConfig`: the validated, defaulted form of the EndpointPickerConfig
//! `flowControl` section and of the flow-control plugins it references.
//!
//! Defaults follow llm-d-router (reference `flow-control.md` §5): request TTL 60 s, no global
//! limits, 1e9 bytes / 5000 requests per band, FCFS ordering, global-strict fairness and a
//! static usage limit of 1.0.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use sluice_core::config::{FlowControlSpec, PluginSpec, PriorityBandSpec};
use sluice_core::quantity::{Quantity, parse_duration};

/// Plugin type of the first-come-first-served ordering policy.
pub const FCFS_ORDERING: &str = "fcfs-ordering-policy";
/// Plugin type of the earliest-deadline-first ordering policy (deadline = enqueue + TTL).
pub const EDF_ORDERING: &str = "edf-ordering-policy";
/// Plugin type of the SLO-deadline ordering policy (deadline = arrival + `x-slo-ttft-ms`).
pub const SLO_DEADLINE_ORDERING: &str = "slo-deadline-ordering-policy";
/// Plugin type of the workload-aware ordering policy (sluice extension, not upstream).
pub const WORKLOAD_AWARE_ORDERING: &str = "workload-aware-ordering-policy";
/// Plugin type of the global-strict fairness policy.
pub const GLOBAL_STRICT_FAIRNESS: &str = "global-strict-fairness-policy";
/// Plugin type of the round-robin fairness policy.
pub const ROUND_ROBIN_FAIRNESS: &str = "round-robin-fairness-policy";
/// Plugin type of the static usage-limit policy.
pub const STATIC_USAGE_LIMIT: &str = "static-usage-limit-policy";
/// Plugin type of the priority-holdback usage-limit policy.
pub const PRIORITY_HOLDBACK: &str = "priority-holdback-policy";

/// Upstream's default request TTL.
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(60);
/// Upstream's default per-band byte limit.
pub const DEFAULT_BAND_MAX_BYTES: u64 = 1_000_000_000;
/// Upstream's default per-band request limit.
pub const DEFAULT_BAND_MAX_REQUESTS: u64 = 5000;

/// A `flowControl` section that cannot be used, naming the key and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A quantity or duration did not parse.
    #[error("flowControl.{key}: {source}")]
    Value {
        /// The offending key, as a path inside `flowControl`.
        key: String,
        /// Why it did not parse.
        source: sluice_core::quantity::ParseError,
    },
    /// A plugin reference names neither a declared plugin instance nor a known type.
    #[error(
        "flowControl.{key}: {name:?} is not a declared plugin nor a known {kind} type; expected one of {expected:?}"
    )]
    UnknownPlugin {
        /// The key holding the reference.
        key: String,
        /// The reference as written.
        name: String,
        /// What kind of plugin was expected.
        kind: &'static str,
        /// Plugin types that would be accepted.
        expected: &'static [&'static str],
    },
    /// A plugin parameter is missing, of the wrong type or out of range.
    #[error("plugin {plugin:?} parameter {param}: {why}")]
    Parameter {
        /// The plugin instance name.
        plugin: String,
        /// The parameter name.
        param: &'static str,
        /// What was expected.
        why: String,
    },
    /// Two `priorityBands` entries use the same priority.
    #[error("flowControl.priorityBands: priority {0} is listed more than once")]
    DuplicateBand(i32),
    /// A `priorityBands` entry has no priority.
    #[error("flowControl.priorityBands[{0}].priority is required")]
    MissingBandPriority(usize),
    /// A feature sluice does not implement was turned on.
    #[error("flowControl.{key}: {why}")]
    Unsupported {
        /// The key.
        key: &'static str,
        /// Why it is not accepted.
        why: &'static str,
    },
}

/// How requests are ordered inside one flow (and, with global-strict fairness, across a band).
#[derive(Debug, Clone, PartialEq)]
pub enum OrderingPolicy {
    /// Oldest enqueue first.
    Fcfs,
    /// Earliest `enqueue + TTL` first; no TTL sorts last; FCFS tie-break.
    Edf,
    /// Earliest `arrival + x-slo-ttft-ms` first; no SLO sorts last; FCFS tie-break.
    SloDeadline,
    /// Highest workload-aware score first (see [`ScoreParams`]).
    WorkloadAware(ScoreParams),
}

/// How the next flow is chosen inside one band.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FairnessPolicy {
    /// The best head across all flows by the ordering policy.
    GlobalStrict,
    /// Flows take turns in the order of their ids; empty flows are skipped.
    RoundRobin,
}

/// Saturation ceilings per band: a band may dispatch only while saturation is below its
/// ceiling.
#[derive(Debug, Clone, PartialEq)]
pub enum UsageLimitPolicy {
    /// The same ceiling for every band.
    Static {
        /// Ceiling (upstream default 1.0: no gating below full saturation).
        threshold: f64,
    },
    /// Ceilings fall linearly from `max_ceiling` for the highest band to `min_ceiling` for
    /// the lowest, so low priorities stop earlier and leave headroom for high ones.
    PriorityHoldback {
        /// Ceiling of the highest band (default 1.0).
        max_ceiling: f64,
        /// Ceiling of the lowest band (required).
        min_ceiling: f64,
        /// Interpolate by band position (`rank`) or by numeric priority (`value`).
        by_value: bool,
    },
}

impl UsageLimitPolicy {
    /// The ceiling of the band with `priority`, given every band's priority (any order).
    pub fn ceiling(&self, priority: i32, all: &[i32]) -> f64 {
        match *self {
            UsageLimitPolicy::Static { threshold } => threshold,
            UsageLimitPolicy::PriorityHoldback {
                max_ceiling,
                min_ceiling,
                by_value,
            } => {
                let hi = all.iter().copied().max().unwrap_or(priority);
                let lo = all.iter().copied().min().unwrap_or(priority);
                let frac = if by_value {
                    if hi == lo {
                        0.0
                    } else {
                        f64::from(hi - priority) / f64::from(hi - lo)
                    }
                } else {
                    let rank = all.iter().filter(|&&p| p > priority).count();
                    let n = all.len();
                    if n <= 1 {
                        0.0
                    } else {
                        rank as f64 / (n - 1) as f64
                    }
                };
                max_ceiling - frac * (max_ceiling - min_ceiling)
            }
        }
    }
}

/// The weights and caps of the workload-aware score
/// `w_wait·min(wait/max_wait, 1) + w_crit·criticality/5 − w_rate·min(rate/max_rate, 1)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreParams {
    /// Weight of the normalised wait (anti-starvation); seed default 0.4.
    pub wait_weight: f64,
    /// Weight of the normalised criticality; seed default 0.4.
    pub criticality_weight: f64,
    /// Weight of the normalised request rate (penalty for noisy workloads); seed default 0.2.
    pub rate_weight: f64,
    /// Wait at which the wait term stops growing; seed default 60 s.
    pub max_wait: Duration,
    /// Request rate (req/s) at which the rate term stops growing; seed default 100.
    pub max_rate: f64,
}

impl Default for ScoreParams {
    fn default() -> Self {
        Self {
            wait_weight: 0.4,
            criticality_weight: 0.4,
            rate_weight: 0.2,
            max_wait: Duration::from_secs(60),
            max_rate: 100.0,
        }
    }
}

/// Settings of the workload registry and the `X-Workload-Context` parser.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadConfig {
    /// Length of the sliding window the request rate is measured over (default 60 s).
    pub window: Duration,
    /// How often idle workloads are dropped (default 5 min).
    pub cleanup_interval: Duration,
    /// A workload with no active request and no arrival for this long is dropped (5 min).
    pub idle_timeout: Duration,
    /// Criticality given to requests without a usable header (default 3).
    pub default_criticality: u8,
    /// Most workloads tracked at once; arrivals beyond it are counted under
    /// [`crate::workload::OVERFLOW_WORKLOAD`] so memory stays bounded (default 10 000).
    pub max_workloads: usize,
    /// Most workloads given their own label in per-workload metrics; the rest are summed
    /// under `other` (default 20).
    pub max_metric_workloads: usize,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            cleanup_interval: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(300),
            default_criticality: 3,
            max_workloads: 10_000,
            max_metric_workloads: 20,
        }
    }
}

/// One priority band's limits and policies.
#[derive(Debug, Clone, PartialEq)]
pub struct BandConfig {
    /// Byte limit on this band's queue (0 = unlimited).
    pub max_bytes: u64,
    /// Request limit on this band's queue (0 = unlimited).
    pub max_requests: u64,
    /// Ordering inside a flow.
    pub ordering: OrderingPolicy,
    /// Choice between flows.
    pub fairness: FairnessPolicy,
}

impl Default for BandConfig {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_BAND_MAX_BYTES,
            max_requests: DEFAULT_BAND_MAX_REQUESTS,
            ordering: OrderingPolicy::Fcfs,
            fairness: FairnessPolicy::GlobalStrict,
        }
    }
}

/// The flow controller's configuration, defaulted and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowControlConfig {
    /// Global byte limit across all queues (0 = unlimited).
    pub max_bytes: u64,
    /// Global request limit across all queues (0 = unlimited).
    pub max_requests: u64,
    /// How long a request may wait (zero = until the client gives up).
    pub default_request_ttl: Duration,
    /// How long a request may wait while the pool has no endpoints.
    pub no_endpoint_request_ttl: Duration,
    /// Template for priorities not listed in `bands` (priority ≥ 0).
    pub default_band: BandConfig,
    /// Template for negative priorities not listed in `bands`.
    pub default_negative_band: BandConfig,
    /// Explicitly configured bands by priority.
    pub bands: BTreeMap<i32, BandConfig>,
    /// Dispatch gate per band.
    pub usage_limit: UsageLimitPolicy,
    /// How often a blocked queue re-reads saturation when nobody signals a change (upstream
    /// ticks every 1 ms).
    pub recheck_interval: Duration,
    /// Workload registry and header parsing.
    pub workload: WorkloadConfig,
}

impl Default for FlowControlConfig {
    fn default() -> Self {
        Self {
            max_bytes: 0,
            max_requests: 0,
            default_request_ttl: DEFAULT_REQUEST_TTL,
            no_endpoint_request_ttl: DEFAULT_REQUEST_TTL,
            default_band: BandConfig::default(),
            default_negative_band: BandConfig::default(),
            bands: BTreeMap::new(),
            usage_limit: UsageLimitPolicy::Static { threshold: 1.0 },
            recheck_interval: Duration::from_millis(1),
            workload: WorkloadConfig::default(),
        }
    }
}

impl FlowControlConfig {
    /// Builds the configuration from the `flowControl` section and the config's `plugins`
    /// (policy references resolve to plugin instances by name, or directly to a type name).
    pub fn from_spec(spec: &FlowControlSpec, plugins: &[PluginSpec]) -> Result<Self, ConfigError> {
        let mut cfg = FlowControlConfig {
            max_bytes: quantity("maxBytes", spec.max_bytes.as_ref(), 0)?,
            max_requests: quantity("maxRequests", spec.max_requests.as_ref(), 0)?,
            ..FlowControlConfig::default()
        };
        if let Some(ttl) = &spec.default_request_ttl {
            cfg.default_request_ttl = duration("defaultRequestTTL", ttl)?;
        }
        cfg.no_endpoint_request_ttl = match &spec.no_endpoint_request_ttl {
            Some(ttl) => duration("noEndpointRequestTTL", ttl)?,
            None if cfg.default_request_ttl.is_zero() => DEFAULT_REQUEST_TTL,
            None => cfg.default_request_ttl,
        };
        let mut workload_params: Option<&PluginSpec> = None;
        let base = BandConfig::default();
        if let Some(b) = &spec.default_priority_band {
            cfg.default_band = band(
                "defaultPriorityBand",
                b,
                &base,
                plugins,
                &mut workload_params,
            )?;
        }
        cfg.default_negative_band = match &spec.default_negative_priority_band {
            Some(b) => band(
                "defaultNegativePriorityBand",
                b,
                &base,
                plugins,
                &mut workload_params,
            )?,
            None => cfg.default_band.clone(),
        };
        for (i, b) in spec.priority_bands.iter().enumerate() {
            let priority = b.priority.ok_or(ConfigError::MissingBandPriority(i))?;
            let template = if priority < 0 {
                &cfg.default_negative_band
            } else {
                &cfg.default_band
            };
            let key = format!("priorityBands[{i}]");
            let built = band(&key, b, template, plugins, &mut workload_params)?;
            if cfg.bands.insert(priority, built).is_some() {
                return Err(ConfigError::DuplicateBand(priority));
            }
        }
        if let Some(name) = &spec.usage_limit_policy_plugin_ref {
            cfg.usage_limit = usage_limit(name, plugins)?;
        }
        if spec.enable_eviction == Some(true) {
            return Err(ConfigError::Unsupported {
                key: "enableEviction",
                why: "eviction of dispatched requests is not implemented by sluice; remove the key or set it to false",
            });
        }
        if let Some(p) = workload_params {
            cfg.workload = workload_config(p)?;
        }
        Ok(cfg)
    }

    /// The flow-control configuration of a whole EndpointPickerConfig: `None` unless the
    /// `flowControl` feature gate is on (upstream's default is off), else the `flowControl`
    /// section (defaults when absent) with its plugin references resolved.
    pub fn from_picker_config(
        cfg: &sluice_core::EndpointPickerConfig,
    ) -> Result<Option<Self>, ConfigError> {
        if !cfg.has_feature_gate("flowControl") {
            return Ok(None);
        }
        let spec = cfg.flow_control.clone().unwrap_or_default();
        Self::from_spec(&spec, &cfg.plugins).map(Some)
    }

    /// The band configuration that applies to `priority`.
    pub fn band(&self, priority: i32) -> &BandConfig {
        match self.bands.get(&priority) {
            Some(b) => b,
            None if priority < 0 => &self.default_negative_band,
            None => &self.default_band,
        }
    }
}

fn quantity(key: &str, q: Option<&Quantity>, default: u64) -> Result<u64, ConfigError> {
    match q {
        None => Ok(default),
        Some(q) => q.to_u64().map_err(|source| ConfigError::Value {
            key: key.to_owned(),
            source,
        }),
    }
}

fn duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    parse_duration(text).map_err(|source| ConfigError::Value {
        key: key.to_owned(),
        source,
    })
}

/// Resolves a plugin reference: a declared instance name first, then a bare type name.
fn resolve<'n, 'a: 'n>(
    name: &'n str,
    plugins: &'a [PluginSpec],
) -> (&'n str, Option<&'a PluginSpec>) {
    match plugins.iter().find(|p| p.instance_name() == name) {
        Some(p) => (p.type_.as_str(), Some(p)),
        None => (name, None),
    }
}

fn band<'a>(
    key: &str,
    spec: &PriorityBandSpec,
    template: &BandConfig,
    plugins: &'a [PluginSpec],
    workload_params: &mut Option<&'a PluginSpec>,
) -> Result<BandConfig, ConfigError> {
    let mut out = template.clone();
    out.max_bytes = quantity(
        &format!("{key}.maxBytes"),
        spec.max_bytes.as_ref(),
        out.max_bytes,
    )?;
    out.max_requests = quantity(
        &format!("{key}.maxRequests"),
        spec.max_requests.as_ref(),
        out.max_requests,
    )?;
    if let Some(name) = &spec.ordering_policy_ref {
        let (ty, plugin) = resolve(name, plugins);
        out.ordering = match ty {
            FCFS_ORDERING => OrderingPolicy::Fcfs,
            EDF_ORDERING => OrderingPolicy::Edf,
            SLO_DEADLINE_ORDERING => OrderingPolicy::SloDeadline,
            WORKLOAD_AWARE_ORDERING => {
                if workload_params.is_none() {
                    *workload_params = plugin;
                }
                OrderingPolicy::WorkloadAware(match plugin {
                    Some(p) => score_params(p)?,
                    None => ScoreParams::default(),
                })
            }
            _ => {
                return Err(ConfigError::UnknownPlugin {
                    key: format!("{key}.orderingPolicyRef"),
                    name: name.clone(),
                    kind: "ordering policy",
                    expected: &[
                        FCFS_ORDERING,
                        EDF_ORDERING,
                        SLO_DEADLINE_ORDERING,
                        WORKLOAD_AWARE_ORDERING,
                    ],
                });
            }
        };
    }
    if let Some(name) = &spec.fairness_policy_ref {
        out.fairness = match resolve(name, plugins).0 {
            GLOBAL_STRICT_FAIRNESS => FairnessPolicy::GlobalStrict,
            ROUND_ROBIN_FAIRNESS => FairnessPolicy::RoundRobin,
            _ => {
                return Err(ConfigError::UnknownPlugin {
                    key: format!("{key}.fairnessPolicyRef"),
                    name: name.clone(),
                    kind: "fairness policy",
                    expected: &[GLOBAL_STRICT_FAIRNESS, ROUND_ROBIN_FAIRNESS],
                });
            }
        };
    }
    Ok(out)
}

fn usage_limit(name: &str, plugins: &[PluginSpec]) -> Result<UsageLimitPolicy, ConfigError> {
    let (ty, plugin) = resolve(name, plugins);
    let params = Params::new(plugin, name);
    match ty {
        STATIC_USAGE_LIMIT => Ok(UsageLimitPolicy::Static {
            threshold: params.ratio("threshold")?.unwrap_or(1.0),
        }),
        PRIORITY_HOLDBACK => {
            let max_ceiling = params.ratio("maxCeiling")?.unwrap_or(1.0);
            let min_ceiling =
                params
                    .ratio("minCeiling")?
                    .ok_or_else(|| ConfigError::Parameter {
                        plugin: name.to_owned(),
                        param: "minCeiling",
                        why: "is required (a number between 0 and 1)".to_owned(),
                    })?;
            if min_ceiling > max_ceiling {
                return Err(ConfigError::Parameter {
                    plugin: name.to_owned(),
                    param: "minCeiling",
                    why: format!("{min_ceiling} is above maxCeiling {max_ceiling}"),
                });
            }
            let by_value = match params.string("domain")? {
                None | Some("rank") => false,
                Some("value") => true,
                Some(other) => {
                    return Err(ConfigError::Parameter {
                        plugin: name.to_owned(),
                        param: "domain",
                        why: format!("{other:?}; expected \"rank\" or \"value\""),
                    });
                }
            };
            Ok(UsageLimitPolicy::PriorityHoldback {
                max_ceiling,
                min_ceiling,
                by_value,
            })
        }
        _ => Err(ConfigError::UnknownPlugin {
            key: "usageLimitPolicyPluginRef".to_owned(),
            name: name.to_owned(),
            kind: "usage-limit policy",
            expected: &[STATIC_USAGE_LIMIT, PRIORITY_HOLDBACK],
        }),
    }
}

fn score_params(p: &PluginSpec) -> Result<ScoreParams, ConfigError> {
    let params = Params::new(Some(p), p.instance_name());
    let mut out = ScoreParams::default();
    if let Some(w) = params.object("weights")? {
        let weights = Params {
            value: Some(w),
            plugin: p.instance_name(),
        };
        out.wait_weight = weights.weight("waitTime")?.unwrap_or(out.wait_weight);
        out.criticality_weight = weights
            .weight("criticality")?
            .unwrap_or(out.criticality_weight);
        out.rate_weight = weights.weight("requestRate")?.unwrap_or(out.rate_weight);
    }
    if let Some(d) = params.duration("maxWaitTime")? {
        if d.is_zero() {
            return Err(params.bad("maxWaitTime", "must be greater than zero".to_owned()));
        }
        out.max_wait = d;
    }
    if let Some(r) = params.weight("maxRequestRate")? {
        if r <= 0.0 {
            return Err(params.bad("maxRequestRate", "must be greater than zero".to_owned()));
        }
        out.max_rate = r;
    }
    Ok(out)
}

fn workload_config(p: &PluginSpec) -> Result<WorkloadConfig, ConfigError> {
    let params = Params::new(Some(p), p.instance_name());
    let mut out = WorkloadConfig::default();
    if let Some(d) = params.duration("slidingWindowDuration")? {
        if d < Duration::from_secs(1) {
            return Err(params.bad("slidingWindowDuration", "must be at least 1s".to_owned()));
        }
        out.window = d;
    }
    if let Some(d) = params.duration("cleanupInterval")? {
        if d.is_zero() {
            return Err(params.bad("cleanupInterval", "must be greater than zero".to_owned()));
        }
        out.cleanup_interval = d;
    }
    if let Some(d) = params.duration("idleTimeout")? {
        out.idle_timeout = d;
    }
    if let Some(c) = params.integer("defaultCriticality")? {
        if !(1..=5).contains(&c) {
            return Err(params.bad(
                "defaultCriticality",
                format!("{c}; expected an integer 1-5"),
            ));
        }
        out.default_criticality = c as u8;
    }
    if let Some(n) = params.integer("maxWorkloads")? {
        if n < 1 {
            return Err(params.bad("maxWorkloads", format!("{n}; expected at least 1")));
        }
        out.max_workloads = n as usize;
    }
    if let Some(n) = params.integer("maxMetricWorkloads")? {
        if n < 0 {
            return Err(params.bad("maxMetricWorkloads", format!("{n}; expected 0 or more")));
        }
        out.max_metric_workloads = n as usize;
    }
    Ok(out)
}

/// Typed access to a plugin's free-form `parameters`, with errors naming the plugin.
struct Params<'a> {
    value: Option<&'a Value>,
    plugin: &'a str,
}

impl<'a> Params<'a> {
    fn new(p: Option<&'a PluginSpec>, name: &'a str) -> Self {
        Self {
            value: p.and_then(|p| p.parameters.as_ref()),
            plugin: name,
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.value.and_then(|v| v.get(key)).filter(|v| !v.is_null())
    }

    fn bad(&self, param: &'static str, why: String) -> ConfigError {
        ConfigError::Parameter {
            plugin: self.plugin.to_owned(),
            param,
            why,
        }
    }

    fn weight(&self, key: &'static str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f)),
                _ => Err(self.bad(key, format!("{v}; expected a non-negative number"))),
            },
        }
    }

    fn ratio(&self, key: &'static str) -> Result<Option<f64>, ConfigError> {
        match self.weight(key)? {
            Some(f) if f > 1.0 => {
                Err(self.bad(key, format!("{f}; expected a number between 0 and 1")))
            }
            other => Ok(other),
        }
    }

    fn integer(&self, key: &'static str) -> Result<Option<i64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("{v}; expected an integer"))),
        }
    }

    fn string(&self, key: &'static str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("{v}; expected a string"))),
        }
    }

    fn object(&self, key: &'static str) -> Result<Option<&'a Value>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.is_object() => Ok(Some(v)),
            Some(v) => Err(self.bad(key, format!("{v}; expected an object"))),
        }
    }

    fn duration(&self, key: &'static str) -> Result<Option<Duration>, ConfigError> {
        match self.string(key)? {
            None => Ok(None),
            Some(s) => parse_duration(s)
                .map(Some)
                .map_err(|e| self.bad(key, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: Value) -> FlowControlSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn empty_section_gets_upstream_defaults() {
        let cfg = FlowControlConfig::from_spec(&FlowControlSpec::default(), &[]).unwrap();
        assert_eq!(cfg.default_request_ttl, Duration::from_secs(60));
        assert_eq!(cfg.no_endpoint_request_ttl, Duration::from_secs(60));
        assert_eq!(cfg.max_requests, 0);
        assert_eq!(cfg.band(7).max_requests, 5000);
        assert_eq!(cfg.band(-1).max_bytes, 1_000_000_000);
        assert_eq!(cfg.band(0).ordering, OrderingPolicy::Fcfs);
        assert_eq!(cfg.band(0).fairness, FairnessPolicy::GlobalStrict);
        assert_eq!(cfg.usage_limit, UsageLimitPolicy::Static { threshold: 1.0 });
    }

    #[test]
    fn full_section_parses_with_plugin_references() {
        let plugins: Vec<PluginSpec> = serde_json::from_value(serde_json::json!([
            {"name": "wa", "type": "workload-aware-ordering-policy", "parameters": {
                "weights": {"waitTime": 0.5, "criticality": 0.3, "requestRate": 0.2},
                "maxWaitTime": "30s", "maxRequestRate": 50, "slidingWindowDuration": "10s",
                "defaultCriticality": 2}},
            {"type": "round-robin-fairness-policy"},
            {"name": "hold", "type": "priority-holdback-policy", "parameters": {"minCeiling": 0.5}},
        ]))
        .unwrap();
        let s = spec(serde_json::json!({
            "maxBytes": "4Gi", "maxRequests": 100, "defaultRequestTTL": "30s",
            "defaultPriorityBand": {"maxRequests": 10, "orderingPolicyRef": "wa",
                                    "fairnessPolicyRef": "round-robin-fairness-policy"},
            "priorityBands": [{"priority": 10, "orderingPolicyRef": "edf-ordering-policy"}],
            "usageLimitPolicyPluginRef": "hold",
        }));
        let cfg = FlowControlConfig::from_spec(&s, &plugins).unwrap();
        assert_eq!(cfg.max_bytes, 4 << 30);
        assert_eq!(cfg.no_endpoint_request_ttl, Duration::from_secs(30));
        let OrderingPolicy::WorkloadAware(p) = &cfg.band(0).ordering else {
            panic!("not workload-aware")
        };
        assert_eq!(p.wait_weight, 0.5);
        assert_eq!(p.max_wait, Duration::from_secs(30));
        assert_eq!(p.max_rate, 50.0);
        assert_eq!(cfg.workload.window, Duration::from_secs(10));
        assert_eq!(cfg.workload.default_criticality, 2);
        // The listed band inherits the template's limits and fairness, overrides ordering.
        assert_eq!(cfg.band(10).max_requests, 10);
        assert_eq!(cfg.band(10).fairness, FairnessPolicy::RoundRobin);
        assert_eq!(cfg.band(10).ordering, OrderingPolicy::Edf);
        // Holdback: the top band may fill the pool, the bottom one stops at half.
        let all = [10, 0, -5];
        assert_eq!(cfg.usage_limit.ceiling(10, &all), 1.0);
        assert_eq!(cfg.usage_limit.ceiling(0, &all), 0.75);
        assert_eq!(cfg.usage_limit.ceiling(-5, &all), 0.5);
    }

    #[test]
    fn flow_control_is_off_without_its_feature_gate() {
        let mut cfg = sluice_core::EndpointPickerConfig::default();
        assert_eq!(FlowControlConfig::from_picker_config(&cfg), Ok(None));
        cfg.feature_gates.push("flowControl".into());
        let on = FlowControlConfig::from_picker_config(&cfg)
            .unwrap()
            .unwrap();
        assert_eq!(on, FlowControlConfig::default());
        cfg.flow_control = Some(spec(serde_json::json!({"maxRequests": "x"})));
        assert!(FlowControlConfig::from_picker_config(&cfg).is_err());
    }

    #[test]
    fn errors_name_the_key_and_expectation() {
        let cases = [
            (
                serde_json::json!({"maxBytes": "lots"}),
                "flowControl.maxBytes",
            ),
            (
                serde_json::json!({"defaultRequestTTL": "60"}),
                "defaultRequestTTL",
            ),
            (
                serde_json::json!({"priorityBands": [{"priority": 1, "orderingPolicyRef": "lifo"}]}),
                "priorityBands[0].orderingPolicyRef: \"lifo\"",
            ),
            (
                serde_json::json!({"priorityBands": [{"priority": 1}, {"priority": 1}]}),
                "priority 1 is listed more than once",
            ),
            (
                serde_json::json!({"priorityBands": [{"maxBytes": 1}]}),
                "priorityBands[0].priority is required",
            ),
            (
                serde_json::json!({"usageLimitPolicyPluginRef": "priority-holdback-policy"}),
                "minCeiling",
            ),
            (
                serde_json::json!({"enableEviction": true}),
                "enableEviction",
            ),
        ];
        for (v, want) in cases {
            let err = FlowControlConfig::from_spec(&spec(v.clone()), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{v}: {err}");
        }
        let plugins: Vec<PluginSpec> = serde_json::from_value(serde_json::json!([
            {"name": "wa", "type": "workload-aware-ordering-policy", "parameters": {"defaultCriticality": 9}},
        ]))
        .unwrap();
        let s = spec(serde_json::json!({"defaultPriorityBand": {"orderingPolicyRef": "wa"}}));
        let err = FlowControlConfig::from_spec(&s, &plugins)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"wa\"") && err.contains("defaultCriticality") && err.contains("1-5"),
            "{err}"
        );
    }
}
