//! Which model-server metric series mean what, per engine: upstream's
//! `core-metrics-extractor` and its `engineConfigs` parameters.
//!
//! The picker's scraper reads a Prometheus page with an [`EngineMapping`]; which mapping an
//! endpoint gets is decided by [`EngineMappings`], built from the extractor's parameters in
//! the `EndpointPickerConfig`. The controller validates the same parameters before a config
//! may reach a picker, so both sides reject a bad spec with the same message.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::EndpointPickerConfig;
use crate::endpoint::{ENGINE_LABEL, Endpoint};

/// A PromQL-style instant selector: a metric name with optional exact label matches,
/// written `name` or `name{label="value",...}` (values quoted or not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// The metric (series) name.
    pub name: String,
    /// Labels that must have these values.
    pub labels: Vec<(String, String)>,
}

impl Selector {
    /// Parses `name{k="v",k2=v2}`; an empty string means "disabled" and yields `None`.
    pub fn parse(spec: &str) -> Result<Option<Selector>, String> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Ok(None);
        }
        let (name, rest) = match spec.find('{') {
            Some(i) => (&spec[..i], Some(&spec[i + 1..])),
            None => (spec, None),
        };
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(format!("metric selector {spec:?} has no valid metric name"));
        }
        let mut labels = Vec::new();
        if let Some(rest) = rest {
            let inner = rest
                .strip_suffix('}')
                .ok_or_else(|| format!("metric selector {spec:?} is missing its closing '}}'"))?;
            for pair in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    format!("label matcher {pair:?} in {spec:?} is not label=value")
                })?;
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                labels.push((k.trim().to_string(), v.to_string()));
            }
        }
        Ok(Some(Selector {
            name: name.to_string(),
            labels,
        }))
    }

    fn simple(name: &str) -> Option<Selector> {
        Some(Selector {
            name: name.to_string(),
            labels: Vec::new(),
        })
    }

    fn with(name: &str, k: &str, v: &str) -> Option<Selector> {
        Some(Selector {
            name: name.to_string(),
            labels: vec![(k.to_string(), v.to_string())],
        })
    }

    /// Whether a sample line with this metric `name` and raw label text (`k="v",...`, no
    /// braces) is one of this selector's series.
    pub fn matches(&self, name: &[u8], labels: &[u8]) -> bool {
        name == self.name.as_bytes()
            && self
                .labels
                .iter()
                .all(|(k, v)| label_value(labels, k.as_bytes()) == Some(v.as_bytes()))
    }
}

/// Where an engine reports KV-cache geometry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheInfo {
    /// An info series whose labels carry block size and block count.
    Labels {
        /// The info series.
        series: Selector,
        /// Label holding the block size in tokens.
        block_size_label: String,
        /// Label holding the number of blocks.
        num_blocks_label: String,
    },
    /// Two gauges.
    Gauges {
        /// Tokens per block.
        block_size: Option<Selector>,
        /// Number of blocks.
        num_blocks: Option<Selector>,
    },
}

/// Which series mean what for one model-server engine (upstream `core-metrics-extractor`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineMapping {
    /// Requests waiting in the queue.
    pub waiting: Option<Selector>,
    /// Requests running.
    pub running: Option<Selector>,
    /// KV-cache utilisation 0..1.
    pub kv_usage: Option<Selector>,
    /// Fallback for `kv_usage` on older servers (vLLM's `gpu_cache_usage_perc`).
    pub kv_usage_fallback: Option<Selector>,
    /// LoRA info series (value = last-update timestamp; labels list adapters).
    pub lora: Option<Selector>,
    /// KV-cache geometry.
    pub cache_info: Option<CacheInfo>,
}

impl EngineMapping {
    /// The built-in mapping for an engine name (`vllm`, `sglang`, `trtllm-serve`,
    /// `triton-tensorrt-llm`); `None` for an unknown engine.
    pub fn builtin(engine: &str) -> Option<EngineMapping> {
        Some(match engine {
            "vllm" => EngineMapping {
                waiting: Selector::simple("vllm:num_requests_waiting"),
                running: Selector::simple("vllm:num_requests_running"),
                kv_usage: Selector::simple("vllm:kv_cache_usage_perc"),
                kv_usage_fallback: Selector::simple("vllm:gpu_cache_usage_perc"),
                lora: Selector::simple("vllm:lora_requests_info"),
                cache_info: Some(CacheInfo::Labels {
                    series: Selector {
                        name: "vllm:cache_config_info".into(),
                        labels: vec![],
                    },
                    block_size_label: "block_size".into(),
                    num_blocks_label: "num_gpu_blocks".into(),
                }),
            },
            "sglang" => EngineMapping {
                waiting: Selector::simple("sglang:num_queue_reqs"),
                running: Selector::simple("sglang:num_running_reqs"),
                kv_usage: Selector::simple("sglang:token_usage"),
                kv_usage_fallback: None,
                lora: None,
                cache_info: Some(CacheInfo::Labels {
                    series: Selector {
                        name: "sglang:cache_config_info".into(),
                        labels: vec![],
                    },
                    block_size_label: "page_size".into(),
                    num_blocks_label: "num_pages".into(),
                }),
            },
            "trtllm-serve" => EngineMapping {
                waiting: Selector::simple("trtllm_num_requests_waiting"),
                running: Selector::simple("trtllm_num_requests_running"),
                kv_usage: Selector::simple("trtllm_kv_cache_utilization"),
                kv_usage_fallback: None,
                lora: None,
                cache_info: Some(CacheInfo::Gauges {
                    block_size: Selector::simple("trtllm_kv_cache_tokens_per_block"),
                    num_blocks: Selector::simple("trtllm_kv_cache_max_blocks"),
                }),
            },
            "triton-tensorrt-llm" => EngineMapping {
                waiting: Selector::with("nv_trt_llm_request_metrics", "request_type", "waiting"),
                running: Selector::with("nv_trt_llm_request_metrics", "request_type", "scheduled"),
                kv_usage: Selector::with(
                    "nv_trt_llm_kv_cache_block_metrics",
                    "kv_cache_block_type",
                    "fraction",
                ),
                kv_usage_fallback: None,
                lora: None,
                cache_info: Some(CacheInfo::Gauges {
                    block_size: Selector::with(
                        "nv_trt_llm_kv_cache_block_metrics",
                        "kv_cache_block_type",
                        "tokens_per",
                    ),
                    num_blocks: Selector::with(
                        "nv_trt_llm_kv_cache_block_metrics",
                        "kv_cache_block_type",
                        "max",
                    ),
                }),
            },
            _ => return None,
        })
    }

    /// Whether any of the mapping's selectors reads the family `name` (a cheap first test
    /// before labels are looked at).
    pub fn wants(&self, name: &[u8]) -> bool {
        let sel = |s: &Option<Selector>| s.as_ref().is_some_and(|s| s.name.as_bytes() == name);
        sel(&self.waiting)
            || sel(&self.running)
            || sel(&self.kv_usage)
            || sel(&self.kv_usage_fallback)
            || sel(&self.lora)
            || match &self.cache_info {
                Some(CacheInfo::Labels { series, .. }) => series.name.as_bytes() == name,
                Some(CacheInfo::Gauges {
                    block_size,
                    num_blocks,
                }) => sel(block_size) || sel(num_blocks),
                None => false,
            }
    }
}

/// The raw (still escaped) value of label `key` in `k="v",k2="v2"`.
pub fn label_value<'a>(labels: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut rest = labels;
    loop {
        let trimmed = rest
            .iter()
            .position(|b| !matches!(b, b' ' | b','))
            .map(|i| &rest[i..])?;
        let eq = trimmed.iter().position(|&b| b == b'=')?;
        let k = trimmed[..eq].trim_ascii();
        let after = trimmed.get(eq + 1..)?.trim_ascii_start();
        if after.first() != Some(&b'"') {
            return None;
        }
        let mut escaped = false;
        let mut end = None;
        for (i, &b) in after.iter().enumerate().skip(1) {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                end = Some(i);
                break;
            }
        }
        let end = end?;
        if k == key {
            return Some(&after[1..end]);
        }
        rest = after.get(end + 1..)?;
    }
}

/// Label names of a user-defined `cacheInfoSpec` series (upstream's model-server protocol).
const CACHE_BLOCK_SIZE_LABEL: &str = "block_size";
const CACHE_NUM_BLOCKS_LABEL: &str = "num_gpu_blocks";

/// Registry key upstream reserves for the default mapping; no engine may take it.
pub const RESERVED_ENGINE_NAME: &str = "default";

/// Engines with a built-in mapping.
pub const BUILTIN_ENGINES: &[&str] = &["vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm"];

/// The `core-metrics-extractor` parameters, as upstream spells them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtractorParams {
    /// Pod label naming the engine (default `inference.networking.k8s.io/engine-type`).
    #[serde(default)]
    pub engine_label_key: String,
    /// Engine for pods without the label, and for labels naming no known engine.
    #[serde(default)]
    pub default_engine: String,
    /// Mappings that add engines or replace a built-in one of the same name entirely.
    #[serde(default)]
    pub engine_configs: Vec<EngineConfigParams>,
}

/// One `engineConfigs[]` entry: a selector per field, an empty string disabling the field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EngineConfigParams {
    /// The engine's name, as the engine label carries it.
    pub name: String,
    /// Requests waiting in the queue.
    #[serde(default)]
    pub queued_requests_spec: String,
    /// Requests running.
    #[serde(default)]
    pub running_requests_spec: String,
    /// KV-cache utilisation, 0..1.
    #[serde(default)]
    pub kv_usage_spec: String,
    /// LoRA info series (labels `running_lora_adapters`, `waiting_lora_adapters`, `max_lora`).
    #[serde(default)]
    pub lora_spec: String,
    /// KV-cache geometry info series (labels `block_size`, `num_gpu_blocks`).
    #[serde(default)]
    pub cache_info_spec: String,
}

impl EngineConfigParams {
    fn to_mapping(&self) -> Result<EngineMapping, String> {
        let field = |what: &str, spec: &str| {
            Selector::parse(spec).map_err(|e| format!("engine {:?}: {what}: {e}", self.name))
        };
        Ok(EngineMapping {
            waiting: field("queuedRequestsSpec", &self.queued_requests_spec)?,
            running: field("runningRequestsSpec", &self.running_requests_spec)?,
            kv_usage: field("kvUsageSpec", &self.kv_usage_spec)?,
            kv_usage_fallback: None,
            lora: field("loraSpec", &self.lora_spec)?,
            cache_info: field("cacheInfoSpec", &self.cache_info_spec)?.map(|series| {
                CacheInfo::Labels {
                    series,
                    block_size_label: CACHE_BLOCK_SIZE_LABEL.into(),
                    num_blocks_label: CACHE_NUM_BLOCKS_LABEL.into(),
                }
            }),
        })
    }
}

/// Every engine's mapping, the label that selects one, and the default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineMappings {
    label_key: String,
    default_engine: String,
    engines: BTreeMap<String, EngineMapping>,
}

/// The extractor type name in an `EndpointPickerConfig`.
pub const EXTRACTOR_TYPE: &str = "core-metrics-extractor";

impl Default for EngineMappings {
    /// The built-in engines, `vllm` for unlabelled pods, upstream's engine label.
    fn default() -> Self {
        EngineMappings {
            label_key: ENGINE_LABEL.to_string(),
            default_engine: "vllm".to_string(),
            engines: BUILTIN_ENGINES
                .iter()
                .filter_map(|n| Some(((*n).to_string(), EngineMapping::builtin(n)?)))
                .collect(),
        }
    }
}

impl EngineMappings {
    /// The mappings `config` asks for: the parameters of the `core-metrics-extractor` its
    /// data layer references (else the first one declared), or the built-ins when it has
    /// none. `fallback_default` is the default engine when the parameters name none.
    pub fn from_config(
        config: &EndpointPickerConfig,
        fallback_default: &str,
    ) -> Result<Self, String> {
        let extractor = |name: &str| {
            config
                .plugins
                .iter()
                .find(|p| p.type_ == EXTRACTOR_TYPE && p.instance_name() == name)
        };
        let referenced = config
            .data_layer
            .iter()
            .flat_map(|d| &d.sources)
            .flat_map(|s| &s.extractors)
            .find_map(|r| extractor(&r.plugin_ref));
        let spec = referenced.or_else(|| config.plugins.iter().find(|p| p.type_ == EXTRACTOR_TYPE));
        let params = spec.and_then(|p| p.parameters.as_ref());
        Self::from_json(params.unwrap_or(&serde_json::Value::Null), fallback_default).map_err(|e| {
            match spec {
                Some(p) => format!("plugin {:?}: {e}", p.instance_name()),
                None => e,
            }
        })
    }

    /// The built-in engines only, with `default_engine` for unlabelled pods (the picker's
    /// `--default-engine`); an error if it is not a built-in engine.
    pub fn builtin(default_engine: &str) -> Result<Self, String> {
        Self::from_params(&ExtractorParams::default(), default_engine)
    }

    /// Reads the extractor's `parameters` object (`Null` for none). `fallback_default` is
    /// the default engine when the parameters name none.
    pub fn from_json(
        parameters: &serde_json::Value,
        fallback_default: &str,
    ) -> Result<Self, String> {
        let params = match parameters {
            serde_json::Value::Null => ExtractorParams::default(),
            v => ExtractorParams::deserialize(v).map_err(|e| {
                format!(
                    "{e}; expected engineLabelKey, defaultEngine and engineConfigs[] with name, \
                     queuedRequestsSpec, runningRequestsSpec, kvUsageSpec, loraSpec, cacheInfoSpec"
                )
            })?,
        };
        Self::from_params(&params, fallback_default)
    }

    /// Builds the registry: user entries first, then every built-in engine they do not
    /// name (upstream appends its defaults the same way).
    pub fn from_params(params: &ExtractorParams, fallback_default: &str) -> Result<Self, String> {
        let mut engines = BTreeMap::new();
        for entry in &params.engine_configs {
            let name = entry.name.trim();
            if name.is_empty() {
                return Err("engineConfigs: an entry has an empty name".into());
            }
            if name == RESERVED_ENGINE_NAME {
                return Err(format!(
                    "engineConfigs: the engine name {RESERVED_ENGINE_NAME:?} is reserved; \
                     set defaultEngine to choose the default"
                ));
            }
            if engines
                .insert(name.to_string(), entry.to_mapping()?)
                .is_some()
            {
                return Err(format!("engineConfigs: engine {name:?} is listed twice"));
            }
        }
        for name in BUILTIN_ENGINES {
            if !engines.contains_key(*name)
                && let Some(mapping) = EngineMapping::builtin(name)
            {
                engines.insert((*name).to_string(), mapping);
            }
        }
        let default_engine = match params.default_engine.trim() {
            "" => fallback_default.trim(),
            d => d,
        };
        let default_engine = if default_engine.is_empty() {
            "vllm"
        } else {
            default_engine
        };
        if !engines.contains_key(default_engine) {
            return Err(format!(
                "defaultEngine {default_engine:?} is not a known engine; known: {}",
                engines.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let label_key = match params.engine_label_key.trim() {
            "" => ENGINE_LABEL,
            k => k,
        };
        Ok(EngineMappings {
            label_key: label_key.to_string(),
            default_engine: default_engine.to_string(),
            engines,
        })
    }

    /// The engine `endpoint` is scraped as and its mapping: the engine its label names, or
    /// the default engine when the label is absent or names no known engine (the second
    /// value is then `false`, so the caller can say so once).
    pub fn for_endpoint(&self, endpoint: &Endpoint) -> (&str, &EngineMapping, bool) {
        let labelled = endpoint
            .labels
            .get(&self.label_key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty());
        if let Some(name) = labelled
            && let Some((name, mapping)) = self.engines.get_key_value(name)
        {
            return (name, mapping, true);
        }
        let mapping = self.default_mapping();
        (&self.default_engine, mapping, labelled.is_none())
    }

    /// The default engine's name.
    pub fn default_engine(&self) -> &str {
        &self.default_engine
    }

    /// The pod label that names an endpoint's engine.
    pub fn label_key(&self) -> &str {
        &self.label_key
    }

    fn default_mapping(&self) -> &EngineMapping {
        // from_params checked that the default engine is present; an empty mapping would
        // only mean "nothing scraped", never a panic.
        static EMPTY: EngineMapping = EngineMapping {
            waiting: None,
            running: None,
            kv_usage: None,
            kv_usage_fallback: None,
            lora: None,
            cache_info: None,
        };
        self.engines.get(&self.default_engine).unwrap_or(&EMPTY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn endpoint_with(labels: &[(&str, &str)]) -> Endpoint {
        let mut ep = Endpoint::from_address("ns", "10.0.0.1:8000".parse().unwrap());
        for (k, v) in labels {
            ep.labels.insert((*k).into(), (*v).into());
        }
        ep
    }

    #[test]
    fn selectors_parse() {
        let s = Selector::parse(r#"nv_trt_llm_request_metrics{request_type="waiting", x=y}"#)
            .unwrap()
            .unwrap();
        assert_eq!(s.name, "nv_trt_llm_request_metrics");
        assert_eq!(
            s.labels,
            vec![
                ("request_type".into(), "waiting".into()),
                ("x".into(), "y".into())
            ]
        );
        assert_eq!(Selector::parse("").unwrap(), None);
        assert!(Selector::parse("a{b=c").unwrap_err().contains("closing"));
        assert!(Selector::parse("a{b}").unwrap_err().contains("label=value"));
    }

    #[test]
    fn without_parameters_every_builtin_engine_is_known_and_vllm_is_the_default() {
        let m = EngineMappings::from_json(&serde_json::Value::Null, "vllm").unwrap();
        let (name, mapping, known) = m.for_endpoint(&endpoint_with(&[]));
        assert_eq!((name, known), ("vllm", true));
        assert_eq!(mapping, &EngineMapping::builtin("vllm").unwrap());
        let (name, _, known) = m.for_endpoint(&endpoint_with(&[(ENGINE_LABEL, "sglang")]));
        assert_eq!((name, known), ("sglang", true));
        let (name, _, known) = m.for_endpoint(&endpoint_with(&[(ENGINE_LABEL, "tgi")]));
        assert_eq!(
            (name, known),
            ("vllm", false),
            "an unknown engine label falls back to the default and says so"
        );
    }

    #[test]
    fn a_user_entry_replaces_the_builtin_of_its_name_and_empty_specs_disable_fields() {
        let params = json!({
            "engineLabelKey": "example.com/engine",
            "defaultEngine": "my-engine",
            "engineConfigs": [
                {"name": "vllm", "queuedRequestsSpec": "vllm:num_requests_waiting{model_name=\"a\"}"},
                {"name": "my-engine", "queuedRequestsSpec": "q", "runningRequestsSpec": "r",
                 "kvUsageSpec": "kv{kind=gpu}", "cacheInfoSpec": "cache_info"}
            ]
        });
        let m = EngineMappings::from_json(&params, "vllm").unwrap();
        assert_eq!(m.default_engine(), "my-engine");
        let (name, vllm, _) = m.for_endpoint(&endpoint_with(&[("example.com/engine", "vllm")]));
        assert_eq!(name, "vllm");
        assert!(vllm.waiting.is_some());
        assert!(
            vllm.running.is_none() && vllm.kv_usage.is_none() && vllm.kv_usage_fallback.is_none(),
            "the user's vllm entry replaces the built-in one entirely: {vllm:?}"
        );
        let (name, mine, _) = m.for_endpoint(&endpoint_with(&[(ENGINE_LABEL, "vllm")]));
        assert_eq!(
            name, "my-engine",
            "only the configured label key selects an engine"
        );
        assert_eq!(
            mine.kv_usage.as_ref().unwrap().labels,
            vec![("kind".to_string(), "gpu".to_string())]
        );
        assert!(matches!(
            &mine.cache_info,
            Some(CacheInfo::Labels { block_size_label, num_blocks_label, .. })
                if block_size_label == "block_size" && num_blocks_label == "num_gpu_blocks"
        ));
        let (name, _, _) = m.for_endpoint(&endpoint_with(&[("example.com/engine", "sglang")]));
        assert_eq!(name, "sglang", "built-ins not named stay available");
    }

    #[test]
    fn the_extractor_the_data_layer_references_wins() {
        let config: EndpointPickerConfig = serde_json::from_value(json!({
            "plugins": [
                {"name": "first", "type": "core-metrics-extractor", "parameters": {"defaultEngine": "sglang"}},
                {"name": "used", "type": "core-metrics-extractor", "parameters": {"defaultEngine": "trtllm-serve"}}
            ],
            "dataLayer": {"sources": [{"pluginRef": "src", "extractors": [{"pluginRef": "used"}]}]}
        }))
        .unwrap();
        let m = EngineMappings::from_config(&config, "vllm").unwrap();
        assert_eq!(m.default_engine(), "trtllm-serve");
        let none = EngineMappings::from_config(&EndpointPickerConfig::default(), "sglang").unwrap();
        assert_eq!(
            none.default_engine(),
            "sglang",
            "the flag's default applies without parameters"
        );
        assert_eq!(
            EngineMappings::default(),
            EngineMappings::builtin("vllm").unwrap()
        );
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        let cases = [
            (json!({"engineConfigs": [{"name": ""}]}), "empty name"),
            (json!({"engineConfigs": [{"name": "default"}]}), "reserved"),
            (
                json!({"engineConfigs": [{"name": "x"}, {"name": "x"}]}),
                "listed twice",
            ),
            (
                json!({"engineConfigs": [{"name": "x", "kvUsageSpec": "kv{a"}]}),
                "engine \"x\": kvUsageSpec",
            ),
            (
                json!({"defaultEngine": "tgi"}),
                "defaultEngine \"tgi\" is not a known engine",
            ),
            (json!({"engineConfig": []}), "unknown field `engineConfig`"),
        ];
        for (params, want) in cases {
            let err = EngineMappings::from_json(&params, "vllm").unwrap_err();
            assert!(err.contains(want), "{params}: {err}");
        }
        assert!(EngineMappings::builtin("nope").is_err());
    }
}
