//! Loading an `EndpointPickerConfig`: parsing, upstream's defaulting, upstream's validation,
//! and instantiation of every plugin through the [`Registry`].
//!
//! Every problem is collected (not just the first), and each names where it is
//! (`plugins[2] "my-scorer" (type queue-scorer)`, `schedulingProfiles[0].plugins[1]`), what is
//! wrong and what was expected.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use sluice_core::EndpointPickerConfig;
use sluice_core::config::{PluginRefSpec, PluginSpec, SchedulingPluginRef, SchedulingProfileSpec};

use crate::plugin::{Plugin, TypedName};
use crate::registry::{PluginEnv, PluginInit, Registry};

/// Feature gates upstream v1.5.0 knows; any other is a validation error.
pub const KNOWN_FEATURE_GATES: &[&str] = &["dataLayer", "flowControl", "enableLegacyMetrics"];

/// The profile handler added when there is exactly one profile and none is declared.
pub const SINGLE_PROFILE_HANDLER: &str = "single-profile-handler";
/// The picker added to a profile that has none.
pub const MAX_SCORE_PICKER: &str = "max-score-picker";
/// The saturation detector added when none is configured.
pub const UTILIZATION_DETECTOR: &str = "utilization-detector";
/// The parser added when none is configured.
pub const OPENAI_PARSER: &str = "openai-parser";
/// The data source added when neither `dataLayer` nor `enableLegacyMetrics` is given.
pub const METRICS_DATA_SOURCE: &str = "metrics-data-source";
/// The extractor added with [`METRICS_DATA_SOURCE`].
pub const CORE_METRICS_EXTRACTOR: &str = sluice_core::engine_metrics::EXTRACTOR_TYPE;

/// What kind of problem a [`ConfigProblem`] is; one variant per upstream validation rule
/// plus the checks sluice adds (parameters, weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// The document is not valid YAML/JSON of the expected shape.
    Syntax,
    /// A feature gate upstream does not know.
    UnknownFeatureGate,
    /// A plugin without `type`.
    MissingPluginType,
    /// A plugin `type` no factory is registered for.
    UnknownPluginType,
    /// Two plugins with one instance name.
    DuplicatePluginName,
    /// The plugin's factory rejected its `parameters`.
    InvalidParameters,
    /// A profile without `name`.
    MissingProfileName,
    /// Two profiles with one name.
    DuplicateProfileName,
    /// A `pluginRef` naming no declared plugin.
    UnknownPluginRef,
    /// A reference to a plugin that does not implement what the reference needs.
    WrongPluginKind,
    /// More than one picker in one profile.
    MultiplePickers,
    /// More than one profile handler.
    MultipleProfileHandlers,
    /// No profile handler although there are several profiles.
    NoProfileHandler,
    /// `single-profile-handler` with several profiles.
    SingleProfileHandlerWithManyProfiles,
    /// A scorer weight that is not a finite number ≥ 0.
    InvalidWeight,
}

/// One thing wrong with a config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Which rule.
    pub kind: ProblemKind,
    /// Where, as a path into the document (`plugins[1] "x" (type y)`).
    pub location: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.location, self.message)
        }
    }
}

/// Every problem found in a config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The problems, in document order.
    pub problems: Vec<ConfigProblem>,
}

impl ConfigError {
    fn single(kind: ProblemKind, location: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![ConfigProblem {
                kind,
                location: location.into(),
                message: message.into(),
            }],
        }
    }

    /// Whether some problem is of this kind.
    pub fn has(&self, kind: ProblemKind) -> bool {
        self.problems.iter().any(|p| p.kind == kind)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid EndpointPickerConfig ({} problem{})",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Parses a standalone config document (YAML or JSON text, as given to the Go EPP's
/// `--config-text`). `apiVersion` and `kind` are checked when present.
pub fn parse_config_text(text: &str) -> Result<EndpointPickerConfig, ConfigError> {
    let value: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Object(serde_json::Map::new())
    } else {
        serde_saphyr::from_str(text).map_err(|e| {
            ConfigError::single(
                ProblemKind::Syntax,
                "",
                format!("not a valid YAML document: {e}"),
            )
        })?
    };
    let value = if value.is_null() {
        serde_json::Value::Object(serde_json::Map::new())
    } else {
        value
    };
    let unknown = unknown_keys(&value);
    if !unknown.is_empty() {
        return Err(ConfigError { problems: unknown });
    }
    if let Some(plugins) = value.get("plugins").and_then(|p| p.as_array()) {
        let missing: Vec<ConfigProblem> = plugins
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_object() && p.get("type").is_none_or(|t| !t.is_string()))
            .map(|(i, _)| ConfigProblem {
                kind: ProblemKind::MissingPluginType,
                location: format!("plugins[{i}]"),
                message: "plugin has no `type`; expected a registered plugin type such as \"queue-scorer\"".to_owned(),
            })
            .collect();
        if !missing.is_empty() {
            return Err(ConfigError { problems: missing });
        }
    }
    EndpointPickerConfig::from_document(value.clone()).map_err(|e| {
        // serde names the problem but not where; find the top-level key that fails alone.
        let location = value
            .as_object()
            .and_then(|m| {
                m.iter().find(|(k, v)| {
                    let mut one = serde_json::Map::new();
                    one.insert((*k).clone(), (*v).clone());
                    EndpointPickerConfig::from_document(serde_json::Value::Object(one)).is_err()
                })
            })
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
        ConfigError::single(ProblemKind::Syntax, location, e.to_string())
    })
}

/// Keys serde would silently ignore: a misplaced `weight` on a plugin, a typo in
/// `schedulingProfiles`. Reported as problems so that the user learns the setting has no
/// effect.
fn unknown_keys(doc: &serde_json::Value) -> Vec<ConfigProblem> {
    const TOP: &[&str] = &[
        "apiVersion",
        "kind",
        "featureGates",
        "plugins",
        "schedulingProfiles",
        "saturationDetector",
        "dataLayer",
        "flowControl",
        "parser",
    ];
    const PLUGIN: &[&str] = &["name", "type", "parameters"];
    const PROFILE: &[&str] = &["name", "plugins"];
    const REF: &[&str] = &["pluginRef", "weight"];
    let mut out = Vec::new();
    let mut check = |v: &serde_json::Value, allowed: &[&str], location: String, hint: &str| {
        if let Some(m) = v.as_object() {
            for k in m.keys().filter(|k| !allowed.contains(&k.as_str())) {
                out.push(ConfigProblem {
                    kind: ProblemKind::Syntax,
                    location: location.clone(),
                    message: format!("unknown key `{k}`; expected one of {allowed:?}{hint}"),
                });
            }
        }
    };
    check(doc, TOP, String::new(), "");
    for (i, p) in doc
        .get("plugins")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let hint = if p.get("weight").is_some() {
            " (a scorer's weight goes on its pluginRef in a profile)"
        } else {
            ""
        };
        check(p, PLUGIN, format!("plugins[{i}]"), hint);
    }
    for (i, p) in doc
        .get("schedulingProfiles")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
        .enumerate()
    {
        check(p, PROFILE, format!("schedulingProfiles[{i}]"), "");
        for (j, r) in p
            .get("plugins")
            .and_then(|p| p.as_array())
            .into_iter()
            .flatten()
            .enumerate()
        {
            check(r, REF, format!("schedulingProfiles[{i}].plugins[{j}]"), "");
        }
    }
    out
}

/// The configuration upstream uses when none is supplied: `queue-scorer` (weight 2),
/// `kv-cache-utilization-scorer` (2), `prefix-cache-scorer` (3) and `max-score-picker` in one
/// `default` profile.
pub fn default_config() -> EndpointPickerConfig {
    let plugin = |t: &str| PluginSpec {
        name: None,
        type_: t.to_owned(),
        parameters: None,
    };
    let r = |n: &str, w: Option<f64>| SchedulingPluginRef {
        plugin_ref: n.to_owned(),
        weight: w,
    };
    EndpointPickerConfig {
        plugins: vec![
            plugin("queue-scorer"),
            plugin("kv-cache-utilization-scorer"),
            plugin("prefix-cache-scorer"),
            plugin(MAX_SCORE_PICKER),
        ],
        scheduling_profiles: vec![SchedulingProfileSpec {
            name: "default".to_owned(),
            plugins: vec![
                r("queue-scorer", Some(2.0)),
                r("kv-cache-utilization-scorer", Some(2.0)),
                r("prefix-cache-scorer", Some(3.0)),
                r(MAX_SCORE_PICKER, None),
            ],
        }],
        ..EndpointPickerConfig::default()
    }
}

/// A profile after defaulting, with its plugins resolved.
#[derive(Debug)]
pub(crate) struct LoadedProfile {
    pub name: Arc<str>,
    pub filters: Vec<(Arc<str>, Arc<dyn crate::Filter>)>,
    pub scorers: Vec<(Arc<str>, Arc<dyn crate::Scorer>, f64)>,
    pub picker: (Arc<str>, Arc<dyn crate::Picker>),
}

/// A config after defaulting and validation, with every plugin instantiated.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub config: EndpointPickerConfig,
    /// Every instance, in declaration order (auto-added ones last).
    pub plugins: Vec<Arc<dyn Plugin>>,
    pub profiles: Vec<LoadedProfile>,
    pub handler: Arc<dyn crate::ProfileHandler>,
    pub handler_name: Arc<str>,
    pub detector: Option<Arc<dyn crate::SaturationDetector>>,
}

fn plugin_location(i: usize, spec: &PluginSpec) -> String {
    let name = spec.instance_name();
    if name == spec.type_ {
        format!("plugins[{i}] {name:?}")
    } else {
        format!("plugins[{i}] {name:?} (type {:?})", spec.type_)
    }
}

/// Runs upstream's defaulting and validation and instantiates every plugin. The returned
/// config is the defaulted document (what the Go EPP would log as its effective config).
pub(crate) fn load(
    cfg: &EndpointPickerConfig,
    registry: &Registry,
    env: &PluginEnv,
) -> Result<Loaded, ConfigError> {
    let mut problems = Vec::new();
    let mut push = |kind, location: String, message: String| {
        problems.push(ConfigProblem {
            kind,
            location,
            message,
        })
    };

    // "No config at all" is upstream's default config; a document without plugins and
    // profiles gets the default plugins and profile and keeps its other settings.
    let default_cfg;
    let cfg = if cfg.plugins.is_empty() && cfg.scheduling_profiles.is_empty() {
        let d = default_config();
        default_cfg = EndpointPickerConfig {
            plugins: d.plugins,
            scheduling_profiles: d.scheduling_profiles,
            ..cfg.clone()
        };
        &default_cfg
    } else {
        cfg
    };
    let mut out = cfg.clone();

    for (i, gate) in cfg.feature_gates.iter().enumerate() {
        if !KNOWN_FEATURE_GATES.contains(&gate.as_str()) {
            push(
                ProblemKind::UnknownFeatureGate,
                format!("featureGates[{i}]"),
                format!("unknown feature gate {gate:?}; expected one of {KNOWN_FEATURE_GATES:?}"),
            );
        }
    }

    // 1. name = type; instantiate.
    let mut instances: BTreeMap<String, Arc<dyn Plugin>> = BTreeMap::new();
    let mut order: Vec<Arc<dyn Plugin>> = Vec::new();
    let mut seen = HashSet::new();
    for (i, spec) in out.plugins.iter_mut().enumerate() {
        if spec.type_.is_empty() {
            push(
                ProblemKind::MissingPluginType,
                format!("plugins[{i}]"),
                "plugin has no `type`; expected a registered plugin type such as \"queue-scorer\""
                    .to_owned(),
            );
            continue;
        }
        if spec.name.as_deref().is_none_or(str::is_empty) {
            spec.name = Some(spec.type_.clone());
        }
        let loc = plugin_location(i, spec);
        let name = spec.instance_name().to_owned();
        if !seen.insert(name.clone()) {
            push(
                ProblemKind::DuplicatePluginName,
                loc,
                format!(
                    "plugin name {name:?} is used twice; expected unique names (set `name` to tell instances of one type apart)"
                ),
            );
            continue;
        }
        let Some(factory) = registry.get(&spec.type_) else {
            push(
                ProblemKind::UnknownPluginType,
                loc,
                format!(
                    "plugin type {:?} is not registered; expected one of: {}",
                    spec.type_,
                    registry.types().collect::<Vec<_>>().join(", ")
                ),
            );
            continue;
        };
        let params = spec.parameters.clone().unwrap_or(serde_json::Value::Null);
        let init = PluginInit {
            typed_name: TypedName::new(&spec.type_, &name),
            parameters: &params,
            env,
        };
        match factory(&init) {
            Ok(p) => {
                instances.insert(name, p.clone());
                order.push(p);
            }
            Err(e) => push(
                ProblemKind::InvalidParameters,
                format!("{loc}.parameters"),
                e,
            ),
        }
    }

    let add_plugin = |type_name: &str,
                      out: &mut EndpointPickerConfig,
                      instances: &mut BTreeMap<String, Arc<dyn Plugin>>,
                      order: &mut Vec<Arc<dyn Plugin>>|
     -> Result<String, String> {
        // Reuse an instance of the type if one is declared (upstream reuses the first one).
        if let Some(p) = order
            .iter()
            .find(|p| &*p.typed_name().type_name == type_name)
        {
            return Ok(p.typed_name().name.to_string());
        }
        let factory = registry
            .get(type_name)
            .ok_or_else(|| format!("plugin type {type_name:?} is not registered"))?;
        let mut name = type_name.to_owned();
        let mut n = 1;
        while instances.contains_key(&name) {
            n += 1;
            name = format!("{type_name}-{n}");
        }
        let init = PluginInit {
            typed_name: TypedName::new(type_name, &name),
            parameters: &serde_json::Value::Null,
            env,
        };
        let p = factory(&init)?;
        instances.insert(name.clone(), p.clone());
        order.push(p);
        out.plugins.push(PluginSpec {
            name: Some(name.clone()),
            type_: type_name.to_owned(),
            parameters: None,
        });
        Ok(name)
    };

    // 2. No profiles ⇒ `default` with every filter, scorer and picker.
    if out.scheduling_profiles.is_empty() {
        let refs = order
            .iter()
            .filter(|p| {
                let p = (*p).clone();
                p.clone().as_filter().is_some()
                    || p.clone().as_scorer().is_some()
                    || p.as_picker().is_some()
            })
            .map(|p| SchedulingPluginRef {
                plugin_ref: p.typed_name().name.to_string(),
                weight: None,
            })
            .collect();
        out.scheduling_profiles.push(SchedulingProfileSpec {
            name: "default".to_owned(),
            plugins: refs,
        });
    }

    // 3. Profile handler.
    let handlers: Vec<Arc<dyn Plugin>> = order
        .iter()
        .filter(|p| (*p).clone().as_profile_handler().is_some())
        .cloned()
        .collect();
    let mut handler: Option<(Arc<str>, Arc<dyn crate::ProfileHandler>)> = None;
    match handlers.len() {
        0 if out.scheduling_profiles.len() == 1 => {
            match add_plugin(SINGLE_PROFILE_HANDLER, &mut out, &mut instances, &mut order) {
                Ok(name) => {
                    handler = instances
                        .get(&name)
                        .and_then(|p| p.clone().as_profile_handler())
                        .map(|h| (Arc::<str>::from(name.as_str()), h));
                }
                Err(e) => push(
                    ProblemKind::NoProfileHandler,
                    "plugins".to_owned(),
                    format!("cannot add {SINGLE_PROFILE_HANDLER}: {e}"),
                ),
            }
        }
        0 => push(
            ProblemKind::NoProfileHandler,
            "plugins".to_owned(),
            format!(
                "{} scheduling profiles need a profile handler; expected one plugin that is a profile handler (for example a custom handler; {SINGLE_PROFILE_HANDLER} only takes one profile)",
                out.scheduling_profiles.len()
            ),
        ),
        1 => {
            let p = &handlers[0];
            handler = p
                .clone()
                .as_profile_handler()
                .map(|h| (p.typed_name().name.clone(), h));
            if &*p.typed_name().type_name == SINGLE_PROFILE_HANDLER
                && out.scheduling_profiles.len() > 1
            {
                push(
                    ProblemKind::SingleProfileHandlerWithManyProfiles,
                    format!("plugins {:?}", &*p.typed_name().name),
                    format!(
                        "{SINGLE_PROFILE_HANDLER} handles exactly one profile but {} are configured; expected one profile or another profile handler",
                        out.scheduling_profiles.len()
                    ),
                );
            }
        }
        _ => push(
            ProblemKind::MultipleProfileHandlers,
            "plugins".to_owned(),
            format!(
                "more than one profile handler: {}; expected exactly one",
                handlers
                    .iter()
                    .map(|p| format!("{:?}", &*p.typed_name().name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    }

    // 4–5. Profiles: names, references, pickers, weights.
    let mut profiles = Vec::new();
    let mut profile_names = HashSet::new();
    let n_profiles = out.scheduling_profiles.len();
    for pi in 0..n_profiles {
        let ploc = format!("schedulingProfiles[{pi}]");
        let pname = out.scheduling_profiles[pi].name.clone();
        if pname.is_empty() {
            push(
                ProblemKind::MissingProfileName,
                ploc.clone(),
                "profile has no `name`; expected a non-empty name".to_owned(),
            );
        } else if !profile_names.insert(pname.clone()) {
            push(
                ProblemKind::DuplicateProfileName,
                ploc.clone(),
                format!("profile name {pname:?} is used twice; expected unique profile names"),
            );
        }
        let mut filters = Vec::new();
        let mut scorers = Vec::new();
        let mut pickers: Vec<(Arc<str>, Arc<dyn crate::Picker>)> = Vec::new();
        for ri in 0..out.scheduling_profiles[pi].plugins.len() {
            let rloc = format!("{ploc}.plugins[{ri}]");
            let r = &mut out.scheduling_profiles[pi].plugins[ri];
            let Some(p) = instances.get(&r.plugin_ref) else {
                if !seen.contains(&r.plugin_ref) {
                    push(
                        ProblemKind::UnknownPluginRef,
                        rloc,
                        format!(
                            "pluginRef {:?} names no plugin; expected the name of a plugin declared under `plugins`",
                            r.plugin_ref
                        ),
                    );
                }
                continue;
            };
            let name = p.typed_name().name.clone();
            let mut used = false;
            if let Some(f) = p.clone().as_filter() {
                filters.push((name.clone(), f));
                used = true;
            }
            if let Some(s) = p.clone().as_scorer() {
                let w = *r.weight.get_or_insert(1.0);
                if !w.is_finite() || w < 0.0 {
                    push(
                        ProblemKind::InvalidWeight,
                        format!("{rloc}.weight"),
                        format!(
                            "weight {w} of scorer {:?} is invalid; expected a finite number ≥ 0",
                            &*name
                        ),
                    );
                }
                scorers.push((name.clone(), s, w));
                used = true;
            }
            if let Some(k) = p.clone().as_picker() {
                pickers.push((name.clone(), k));
                used = true;
            }
            // References to producers and other hooks are accepted (llm-d lists its producer in
            // the profile); they run for every request anyway.
            let other = p.clone().as_data_producer().is_some()
                || p.clone().as_admitter().is_some()
                || p.clone().as_pre_request().is_some()
                || p.clone().as_response_hooks().is_some();
            if !used && !other {
                push(
                    ProblemKind::WrongPluginKind,
                    rloc,
                    format!(
                        "plugin {:?} (type {:?}) is not a filter, scorer or picker; expected one of those in a profile",
                        &*name,
                        &*p.typed_name().type_name
                    ),
                );
            }
        }
        if pickers.len() > 1 {
            push(
                ProblemKind::MultiplePickers,
                ploc.clone(),
                format!(
                    "profile {pname:?} has {} pickers ({}); expected at most one",
                    pickers.len(),
                    pickers
                        .iter()
                        .map(|(n, _)| format!("{:?}", &**n))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        if pickers.is_empty() {
            match add_plugin(MAX_SCORE_PICKER, &mut out, &mut instances, &mut order) {
                Ok(name) => {
                    if let Some(k) = instances.get(&name).and_then(|p| p.clone().as_picker()) {
                        pickers.push((name.as_str().into(), k));
                    }
                    out.scheduling_profiles[pi]
                        .plugins
                        .push(SchedulingPluginRef {
                            plugin_ref: name,
                            weight: None,
                        });
                }
                Err(e) => push(
                    ProblemKind::UnknownPluginType,
                    ploc.clone(),
                    format!("cannot add {MAX_SCORE_PICKER}: {e}"),
                ),
            }
        }
        if let Some(picker) = pickers.into_iter().next() {
            profiles.push(LoadedProfile {
                name: pname.as_str().into(),
                filters,
                scorers,
                picker,
            });
        }
    }

    // 6. Saturation detector, parser, data layer.
    let fc_ref = out
        .flow_control
        .as_ref()
        .and_then(|f| f.saturation_detector.clone());
    let (sd_loc, sd_ref) = match (fc_ref, out.saturation_detector.clone()) {
        (Some(r), _) => ("flowControl.saturationDetector.pluginRef", Some(r)),
        (None, r) => ("saturationDetector.pluginRef", r),
    };
    let sd_name = match sd_ref {
        Some(r) => Some(r.plugin_ref),
        None => match add_plugin(UTILIZATION_DETECTOR, &mut out, &mut instances, &mut order) {
            Ok(name) => {
                out.saturation_detector = Some(PluginRefSpec {
                    plugin_ref: name.clone(),
                });
                Some(name)
            }
            Err(_) => None,
        },
    };
    let mut detector = None;
    if let Some(name) = sd_name {
        match instances.get(&name) {
            Some(p) => match p.clone().as_saturation_detector() {
                Some(d) => detector = Some(d),
                None => push(
                    ProblemKind::WrongPluginKind,
                    sd_loc.to_owned(),
                    format!(
                        "plugin {name:?} (type {:?}) is not a saturation detector; expected e.g. utilization-detector or concurrency-detector",
                        &*p.typed_name().type_name
                    ),
                ),
            },
            None if seen.contains(&name) => {}
            None => push(
                ProblemKind::UnknownPluginRef,
                sd_loc.to_owned(),
                format!(
                    "pluginRef {name:?} names no plugin; expected the name of a plugin declared under `plugins`"
                ),
            ),
        }
    }
    match out.parser.clone() {
        Some(r) => {
            if !seen.contains(&r.plugin_ref) {
                push(
                    ProblemKind::UnknownPluginRef,
                    "parser.pluginRef".to_owned(),
                    format!(
                        "pluginRef {:?} names no plugin; expected the name of a parser declared under `plugins`",
                        r.plugin_ref
                    ),
                );
            }
        }
        None => {
            if let Ok(name) = add_plugin(OPENAI_PARSER, &mut out, &mut instances, &mut order) {
                out.parser = Some(PluginRefSpec { plugin_ref: name });
            }
        }
    }
    match out.data_layer.clone() {
        Some(dl) => {
            for (si, s) in dl.sources.iter().enumerate() {
                let refs =
                    std::iter::once((format!("dataLayer.sources[{si}].pluginRef"), &s.plugin_ref))
                        .chain(s.extractors.iter().enumerate().map(|(ei, e)| {
                            (
                                format!("dataLayer.sources[{si}].extractors[{ei}].pluginRef"),
                                &e.plugin_ref,
                            )
                        }));
                for (loc, r) in refs {
                    if !seen.contains(r) {
                        push(
                            ProblemKind::UnknownPluginRef,
                            loc,
                            format!(
                                "pluginRef {r:?} names no plugin; expected the name of a plugin declared under `plugins`"
                            ),
                        );
                    }
                }
            }
        }
        None if !out.has_feature_gate("enableLegacyMetrics") => {
            let source = add_plugin(METRICS_DATA_SOURCE, &mut out, &mut instances, &mut order);
            let extractor =
                add_plugin(CORE_METRICS_EXTRACTOR, &mut out, &mut instances, &mut order);
            if let (Ok(s), Ok(e)) = (source, extractor) {
                out.data_layer = Some(sluice_core::config::DataLayerSpec {
                    sources: vec![sluice_core::config::DataSourceSpec {
                        plugin_ref: s,
                        extractors: vec![PluginRefSpec { plugin_ref: e }],
                    }],
                });
            }
        }
        None => {}
    }

    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    let Some((handler_name, handler)) = handler else {
        return Err(ConfigError::single(
            ProblemKind::NoProfileHandler,
            "plugins",
            "no profile handler after defaulting",
        ));
    };
    Ok(Loaded {
        config: out,
        plugins: order,
        profiles,
        handler,
        handler_name,
        detector,
    })
}
