//! The config loader: every example of `api.md` §7 loads, defaulting matches upstream's, and
//! each invalid case is rejected with a message naming the plugin/field and the expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use sluice_scheduling::{ProblemKind, Registry, Scheduler, default_config, parse_config_text};

fn load(yaml: &str) -> Result<Scheduler, sluice_scheduling::ConfigError> {
    Scheduler::from_config(&parse_config_text(yaml)?)
}

fn problems(yaml: &str) -> sluice_scheduling::ConfigError {
    match load(yaml) {
        Ok(s) => panic!("config should be rejected but loaded: {s:?}"),
        Err(e) => e,
    }
}

const FULL_EXAMPLE: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: []
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters: {autoTune: true, blockSizeTokens: 16, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}
- type: lora-affinity-scorer
- name: picker
  type: max-score-picker
  parameters: {maxNumOfEndpoints: 1}
- type: single-profile-handler
- type: utilization-detector
  parameters: {queueDepthThreshold: 5, kvCacheUtilThreshold: 0.8, metricsStalenessThreshold: 200ms, headroom: 0.0}
- type: metrics-data-source
  parameters: {scheme: http, path: /metrics, insecureSkipVerify: true}
- type: core-metrics-extractor
- type: openai-parser
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: lora-affinity-scorer, weight: 1}
  - {pluginRef: picker}
saturationDetector: {pluginRef: utilization-detector}
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors: [{pluginRef: core-metrics-extractor}]
parser: {pluginRef: openai-parser}
"#;

const CONFORMANCE: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
schedulingProfiles:
- name: conformance-profile
  plugins:
  - pluginRef: header-based-testing-filter
"#;

#[test]
fn full_example_is_a_fixed_point_of_defaulting() {
    let s = load(FULL_EXAMPLE).unwrap();
    let input = parse_config_text(FULL_EXAMPLE).unwrap();
    // "shape after defaulting": names were filled in, nothing else changed.
    let mut expected = input.clone();
    for p in &mut expected.plugins {
        p.name.get_or_insert_with(|| p.type_.clone());
    }
    assert_eq!(s.config(), &expected);
    assert!(s.saturation_detector().is_some());
}

#[test]
fn conformance_config_gets_handler_picker_detector_parser_and_data_layer() {
    let s = load(CONFORMANCE).unwrap();
    let cfg = s.config();
    let types: Vec<&str> = cfg.plugins.iter().map(|p| p.type_.as_str()).collect();
    assert_eq!(
        types,
        [
            "header-based-testing-filter",
            "destination-endpoint-served-verifier",
            "single-profile-handler",
            "max-score-picker",
            "utilization-detector",
            "openai-parser",
            "metrics-data-source",
            "core-metrics-extractor",
        ]
    );
    let refs: Vec<&str> = cfg.scheduling_profiles[0]
        .plugins
        .iter()
        .map(|r| r.plugin_ref.as_str())
        .collect();
    assert_eq!(refs, ["header-based-testing-filter", "max-score-picker"]);
    assert_eq!(
        cfg.saturation_detector.as_ref().unwrap().plugin_ref,
        "utilization-detector"
    );
    assert_eq!(cfg.parser.as_ref().unwrap().plugin_ref, "openai-parser");
    assert_eq!(
        cfg.data_layer.as_ref().unwrap().sources[0].extractors[0].plugin_ref,
        "core-metrics-extractor"
    );
}

#[test]
fn integration_config_defaults_weights_to_one_and_skips_data_layer_with_legacy_metrics() {
    let s = load(common::INTEGRATION_CONFIG).unwrap();
    let cfg = s.config();
    assert!(
        cfg.scheduling_profiles[0]
            .plugins
            .iter()
            .take(4)
            .all(|r| r.weight == Some(1.0))
    );
    assert!(
        cfg.data_layer.is_none(),
        "enableLegacyMetrics suppresses the default data layer"
    );
    assert_eq!(
        cfg.scheduling_profiles[0]
            .plugins
            .last()
            .unwrap()
            .plugin_ref,
        "max-score-picker"
    );
}

#[test]
fn no_config_equals_upstream_default() {
    let s = Scheduler::default();
    let refs: Vec<(String, Option<f64>)> = s.config().scheduling_profiles[0]
        .plugins
        .iter()
        .map(|r| (r.plugin_ref.clone(), r.weight))
        .collect();
    assert_eq!(
        refs,
        [
            ("queue-scorer".to_owned(), Some(2.0)),
            ("kv-cache-utilization-scorer".to_owned(), Some(2.0)),
            ("prefix-cache-scorer".to_owned(), Some(3.0)),
            ("max-score-picker".to_owned(), None),
        ]
    );
    assert_eq!(&*s.profile_names()[0], "default");
    // An empty document is "no config".
    assert_eq!(load("").unwrap().config(), s.config());
    assert_eq!(
        load("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n")
            .unwrap()
            .config(),
        s.config()
    );
    assert_eq!(default_config().plugins.len(), 4);
    // Other settings of a plugin-less document are kept.
    let fc = load("featureGates: [flowControl]\nflowControl: {defaultRequestTTL: 30s}").unwrap();
    assert_eq!(
        fc.config()
            .flow_control
            .as_ref()
            .unwrap()
            .default_request_ttl
            .as_deref(),
        Some("30s")
    );
    assert_eq!(
        fc.config().scheduling_profiles,
        s.config().scheduling_profiles
    );
}

#[test]
fn no_profiles_means_a_default_profile_with_every_filter_scorer_and_picker() {
    let s = load("plugins: [{type: queue-scorer}, {type: openai-parser}, {type: header-based-testing-filter}, {type: random-picker}]").unwrap();
    let p = &s.config().scheduling_profiles[0];
    assert_eq!(p.name, "default");
    let refs: Vec<&str> = p.plugins.iter().map(|r| r.plugin_ref.as_str()).collect();
    assert_eq!(
        refs,
        [
            "queue-scorer",
            "header-based-testing-filter",
            "random-picker"
        ]
    );
}

#[test]
fn declared_max_score_picker_is_reused_for_profiles_without_one() {
    let s = load(
        "plugins: [{type: queue-scorer}, {name: top2, type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}]\n\
         schedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}]}]",
    )
    .unwrap();
    assert_eq!(
        s.config().scheduling_profiles[0].plugins[1].plugin_ref,
        "top2"
    );
    assert_eq!(
        s.config()
            .plugins
            .iter()
            .filter(|p| p.type_ == "max-score-picker")
            .count(),
        1
    );
}

#[test]
fn flow_control_saturation_detector_wins_over_top_level() {
    let s = load(
        "plugins: [{type: queue-scorer}, {type: utilization-detector}, {type: concurrency-detector}]\n\
         schedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}]}]\n\
         saturationDetector: {pluginRef: utilization-detector}\n\
         flowControl: {saturationDetector: {pluginRef: concurrency-detector}}",
    )
    .unwrap();
    assert!(format!("{:?}", s.saturation_detector().unwrap()).contains("concurrency-detector"));
}

#[test]
fn every_invalid_case_is_rejected_with_an_actionable_message() {
    // (config, problem kind, substrings the message must contain)
    let table: &[(&str, ProblemKind, &[&str])] = &[
        (
            "plugins: [{type: queue-scorer}, {name: queue-scorer, type: kv-cache-utilization-scorer}]",
            ProblemKind::DuplicatePluginName,
            &["plugins[1]", "\"queue-scorer\"", "used twice", "unique"],
        ),
        (
            "plugins: [{type: no-such-scorer}]",
            ProblemKind::UnknownPluginType,
            &[
                "plugins[0]",
                "no-such-scorer",
                "not registered",
                "queue-scorer",
            ],
        ),
        (
            "plugins: [{name: x}]",
            ProblemKind::MissingPluginType,
            &["plugins[0]", "no `type`"],
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: '', plugins: [{pluginRef: queue-scorer}]}]",
            ProblemKind::MissingProfileName,
            &["schedulingProfiles[0]", "no `name`"],
        ),
        (
            "plugins: [{type: queue-scorer}, {type: my-handler}]\nschedulingProfiles: [{name: a, plugins: []}, {name: a, plugins: []}]",
            ProblemKind::DuplicateProfileName,
            &["schedulingProfiles[1]", "\"a\"", "used twice"],
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: qeue-scorer}]}]",
            ProblemKind::UnknownPluginRef,
            &[
                "schedulingProfiles[0].plugins[0]",
                "qeue-scorer",
                "declared under `plugins`",
            ],
        ),
        (
            "plugins: [{type: max-score-picker}, {type: random-picker}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: max-score-picker}, {pluginRef: random-picker}]}]",
            ProblemKind::MultiplePickers,
            &["schedulingProfiles[0]", "2 pickers", "at most one"],
        ),
        (
            "plugins: [{type: queue-scorer}, {type: my-handler}, {name: h2, type: my-handler}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}]}]",
            ProblemKind::MultipleProfileHandlers,
            &[
                "more than one profile handler",
                "\"my-handler\"",
                "\"h2\"",
                "exactly one",
            ],
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}]}, {name: b, plugins: [{pluginRef: queue-scorer}]}]",
            ProblemKind::NoProfileHandler,
            &["2 scheduling profiles", "profile handler"],
        ),
        (
            "plugins: [{type: queue-scorer}, {type: single-profile-handler}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}]}, {name: b, plugins: [{pluginRef: queue-scorer}]}]",
            ProblemKind::SingleProfileHandlerWithManyProfiles,
            &[
                "single-profile-handler",
                "exactly one profile",
                "2 are configured",
            ],
        ),
        (
            "featureGates: [flowControl, fastPath]\nplugins: [{type: queue-scorer}]",
            ProblemKind::UnknownFeatureGate,
            &["featureGates[1]", "fastPath", "dataLayer"],
        ),
        (
            "plugins: [{type: utilization-detector, parameters: {kvCacheUtilThreshold: 1.5}}]",
            ProblemKind::InvalidParameters,
            &[
                "plugins[0] \"utilization-detector\".parameters",
                "kvCacheUtilThreshold is 1.5",
                "(0, 1]",
            ],
        ),
        (
            "plugins: [{type: queue-scorer}, {type: core-metrics-extractor, parameters: {engineConfigs: [{name: tgi, queuedRequestsSpec: 'tgi_queue_size{a'}]}}]",
            ProblemKind::InvalidParameters,
            &[
                "plugins[1] \"core-metrics-extractor\".parameters",
                "engine \"tgi\": queuedRequestsSpec",
                "closing",
            ],
        ),
        (
            "plugins: [{type: queue-scorer}, {type: core-metrics-extractor, parameters: {defaultEngine: tgi}}]",
            ProblemKind::InvalidParameters,
            &["defaultEngine \"tgi\" is not a known engine", "vllm"],
        ),
        (
            "plugins: [{type: utilization-detector, parameters: {metricsStalenessThreshold: 200}}]",
            ProblemKind::InvalidParameters,
            &["metricsStalenessThreshold", "expected"],
        ),
        (
            "plugins: [{type: utilization-detector, parameters: {metricsStalenessThreshold: soon}}]",
            ProblemKind::InvalidParameters,
            &["\"soon\" is not a duration"],
        ),
        (
            "plugins: [{name: pfx, type: prefix-cache-scorer, parameters: {blockSize: 64}}]",
            ProblemKind::InvalidParameters,
            &[
                "plugins[0] \"pfx\" (type \"prefix-cache-scorer\").parameters",
                "blockSize",
                "blockSizeTokens",
            ],
        ),
        (
            "plugins: [{type: prefix-cache-scorer, parameters: {blockSizeToken: 16}}]",
            ProblemKind::InvalidParameters,
            &["unknown field `blockSizeToken`", "blockSizeTokens"],
        ),
        (
            "plugins: [{type: max-score-picker, parameters: {maxNumOfEndpoints: many}}]",
            ProblemKind::InvalidParameters,
            &["maxNumOfEndpoints", "integer"],
        ),
        (
            "plugins: [{type: queue-scorer, parameters: {x: 1}}]",
            ProblemKind::InvalidParameters,
            &["unknown field `x`", "no parameters"],
        ),
        (
            "plugins: [{type: token-load-scorer, parameters: {queueThresholdTokens: 0}}]",
            ProblemKind::InvalidParameters,
            &["queueThresholdTokens is 0", "> 0"],
        ),
        (
            "plugins: [{type: concurrency-detector, parameters: {concurrencyMode: bytes}}]",
            ProblemKind::InvalidParameters,
            &["bytes", "requests"],
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer, weight: -1}]}]",
            ProblemKind::InvalidWeight,
            &[
                "schedulingProfiles[0].plugins[0].weight",
                "\"queue-scorer\"",
                "finite number ≥ 0",
            ],
        ),
        (
            "plugins: [{type: queue-scorer}, {type: openai-parser}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: openai-parser}]}]",
            ProblemKind::WrongPluginKind,
            &[
                "schedulingProfiles[0].plugins[0]",
                "openai-parser",
                "not a filter, scorer or picker",
            ],
        ),
        (
            "plugins: [{type: queue-scorer}]\nsaturationDetector: {pluginRef: queue-scorer}",
            ProblemKind::WrongPluginKind,
            &["saturationDetector.pluginRef", "not a saturation detector"],
        ),
        (
            "plugins: [{type: queue-scorer}]\nparser: {pluginRef: my-parser}",
            ProblemKind::UnknownPluginRef,
            &["parser.pluginRef", "my-parser"],
        ),
        (
            "plugins: [{type: queue-scorer}]\ndataLayer: {sources: [{pluginRef: metrics-data-source, extractors: [{pluginRef: x}]}]}",
            ProblemKind::UnknownPluginRef,
            &["dataLayer.sources[0].pluginRef", "metrics-data-source"],
        ),
        (
            "apiVersion: v1\nkind: ConfigMap",
            ProblemKind::Syntax,
            &["ConfigMap", "EndpointPickerConfig"],
        ),
        (
            "plugins: {type: queue-scorer}",
            ProblemKind::Syntax,
            &["plugins"],
        ),
        ("plugins: [unterminated", ProblemKind::Syntax, &["YAML"]),
        (
            "plugins: [{type: queue-scorer, weight: 2}]",
            ProblemKind::Syntax,
            &[
                "plugins[0]",
                "unknown key `weight`",
                "goes on its pluginRef",
            ],
        ),
        (
            "schedulingProfile: []",
            ProblemKind::Syntax,
            &["unknown key `schedulingProfile`", "schedulingProfiles"],
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer, wieght: 2}]}]",
            ProblemKind::Syntax,
            &["schedulingProfiles[0].plugins[0]", "unknown key `wieght`"],
        ),
    ];
    let mut registry = Registry::with_builtins();
    // A second profile handler type, to exercise the multi-handler rules.
    registry
        .register("my-handler", |init| {
            Ok(std::sync::Arc::new(
                sluice_scheduling::plugins::SingleProfileHandler::new(init.typed_name.clone()),
            ))
        })
        .unwrap();
    let mut failures = Vec::new();
    for (yaml, kind, needles) in table {
        let err = match parse_config_text(yaml)
            .and_then(|c| Scheduler::from_config_with(&c, &registry, Default::default()))
        {
            Ok(_) => {
                failures.push(format!("accepted: {yaml}"));
                continue;
            }
            Err(e) => e,
        };
        let Some(p) = err.problems.iter().find(|p| p.kind == *kind) else {
            failures.push(format!("{yaml}\n    want {kind:?}, got {err}"));
            continue;
        };
        let text = p.to_string();
        for n in *needles {
            if !text.contains(n) {
                failures.push(format!("{yaml}\n    message {text:?} lacks {n:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn all_problems_are_reported_at_once() {
    let err = problems(
        "featureGates: [bogus]\nplugins: [{type: nope}, {type: queue-scorer}, {name: queue-scorer, type: random-picker}]\n\
         schedulingProfiles: [{name: a, plugins: [{pluginRef: missing}]}]",
    );
    assert!(err.has(ProblemKind::UnknownFeatureGate));
    assert!(err.has(ProblemKind::UnknownPluginType));
    assert!(err.has(ProblemKind::DuplicatePluginName));
    assert!(err.has(ProblemKind::UnknownPluginRef));
    assert!(
        err.to_string()
            .starts_with("invalid EndpointPickerConfig (4 problems)"),
        "{err}"
    );
}

#[test]
fn registering_a_type_twice_is_refused() {
    let mut r = Registry::with_builtins();
    let e = r
        .register("queue-scorer", |init| {
            Ok(std::sync::Arc::new(
                sluice_scheduling::plugins::SingleProfileHandler::new(init.typed_name.clone()),
            ))
        })
        .unwrap_err();
    assert!(e.to_string().contains("already registered"));
}

#[test]
fn validate_returns_the_effective_config() {
    let cfg = parse_config_text(CONFORMANCE).unwrap();
    let eff = Scheduler::validate(&cfg, &Registry::with_builtins()).unwrap();
    assert!(
        eff.plugins
            .iter()
            .any(|p| p.type_ == "single-profile-handler")
    );
}
