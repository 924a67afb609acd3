//! Data-driven scheduling cases: one row per case (config, endpoints with metrics, request,
//! earlier requests that warm the prefix index) ⇒ expected scores and pick.
//!
//! The first rows are upstream's integration cases (GIE `test/integration/epp/hermetic_test.go`,
//! run with its `default-config.yaml`: queue, KV, prefix and LoRA scorers, weight 1 each; pod
//! i is 192.168.1.(i+1)). Expected scores below are the formulas of `scheduling.md` §5
//! worked by hand.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use common::*;
use sluice_scheduling::{Outcome, ScheduleError};

const LORA: &str = "sql-lora-1fdg2";

#[derive(Debug)]
enum Want {
    /// The pick (pod index), then fallbacks.
    Targets(Vec<usize>),
    /// The pick is one of these pods.
    OneOf(Vec<usize>),
    /// Scheduling fails with this HTTP status.
    Status(u16),
}

struct Case {
    name: &'static str,
    config: &'static str,
    pods: Vec<Pod>,
    model: &'static str,
    prompt: String,
    headers: Vec<(&'static str, String)>,
    /// Earlier requests, each forced onto one pod (scheduled with that pod as the only
    /// candidate), whose prompts populate the prefix index.
    warmup: Vec<(usize, String)>,
    /// (scorer instance name, score per pod) — only for rows where no filter removes a pod.
    scores: Vec<(&'static str, Vec<f64>)>,
    /// Pods left after filtering, when the row checks it.
    survivors: Option<Vec<usize>>,
    want: Want,
}

impl Default for Case {
    fn default() -> Self {
        Case {
            name: "",
            config: INTEGRATION_CONFIG,
            pods: Vec::new(),
            model: "my-model",
            prompt: String::new(),
            headers: Vec::new(),
            warmup: Vec::new(),
            scores: Vec::new(),
            survivors: None,
            want: Want::Targets(vec![]),
        }
    }
}

fn one_scorer(t: &'static str) -> &'static str {
    match t {
        "queue-scorer" => "plugins: [{type: queue-scorer}]",
        "running-requests-size-scorer" => "plugins: [{type: running-requests-size-scorer}]",
        "kv-cache-utilization-scorer" => "plugins: [{type: kv-cache-utilization-scorer}]",
        "lora-affinity-scorer" => "plugins: [{type: lora-affinity-scorer}]",
        "session-affinity-scorer" => "plugins: [{type: session-affinity-scorer}]",
        _ => unreachable!(),
    }
}

/// A prompt of `blocks` full 16-token (64-character) blocks, distinct per `seed`.
fn prompt(seed: char, blocks: usize) -> String {
    (0..blocks).map(|i| format!("{seed}{:063}", i)).collect()
}

fn cases() -> Vec<Case> {
    vec![
        // ---- upstream integration cases ----
        Case {
            name: "upstream: select lower queue and kv cache, no active lora",
            pods: vec![pod(3, 0.2), pod(0, 0.1), pod(10, 0.2)],
            prompt: "test1".into(),
            scores: vec![
                ("queue-scorer", vec![0.7, 1.0, 0.0]),
                ("kv-cache-utilization-scorer", vec![0.8, 0.9, 0.8]),
                ("prefix-cache-scorer", vec![0.0, 0.0, 0.0]),
            ],
            want: Want::Targets(vec![1]),
            ..Case::default()
        },
        Case {
            name: "upstream: select active lora, low queue",
            pods: vec![
                pod(0, 0.2).active(&["foo", "bar"]),
                pod(0, 0.1).active(&["foo", LORA]),
                pod(10, 0.2).active(&["foo", "bar"]),
            ],
            model: LORA,
            scores: vec![("lora-affinity-scorer", vec![0.0, 1.0, 0.0])],
            want: Want::Targets(vec![1]),
            ..Case::default()
        },
        Case {
            // queue equal (1 each); KV 0.8/0.6/0.7; LoRA 0/1/0 ⇒ 1.8, 2.6, 1.7.
            name: "upstream: select lora despite higher kv cache usage",
            pods: vec![
                pod(10, 0.2).active(&["foo", "bar"]),
                pod(10, 0.4).active(&["foo", LORA]),
                pod(10, 0.3).active(&["foo"]),
            ],
            model: LORA,
            scores: vec![
                ("queue-scorer", vec![1.0, 1.0, 1.0]),
                ("kv-cache-utilization-scorer", vec![0.8, 0.6, 0.7]),
            ],
            want: Want::Targets(vec![1]),
            ..Case::default()
        },
        Case {
            // 0.4+0.8+1 = 2.2 vs 1+0.15 = 1.15 vs 0.1.
            name: "upstream: don't shed requests by default",
            pods: vec![
                pod(6, 0.2).active(&["foo", "bar", LORA]),
                pod(0, 0.85).active(&["foo"]),
                pod(10, 0.9).active(&["foo"]),
            ],
            model: LORA,
            want: Want::Targets(vec![0]),
            ..Case::default()
        },
        Case {
            name: "upstream: noncritical, one server has capacity",
            pods: vec![
                pod(4, 0.2).active(&["foo", "bar", "sql-lora-sheddable"]),
                pod(4, 0.85).active(&["foo", "sql-lora-sheddable"]),
                pod(10, 0.9).active(&["foo", "sql-lora-sheddable"]),
            ],
            model: "sql-lora-sheddable",
            want: Want::Targets(vec![0]),
            ..Case::default()
        },
        Case {
            name: "upstream: objective's model not translated, passthrough",
            pods: vec![pod(4, 0.2), pod(0, 0.85), pod(10, 0.9)],
            model: "direct-model",
            want: Want::Targets(vec![0]),
            ..Case::default()
        },
        // ---- one row per scorer ----
        Case {
            name: "queue-scorer: min-max, fewer waiting is better",
            config: one_scorer("queue-scorer"),
            pods: vec![pod(0, 0.0), pod(5, 0.0), pod(10, 0.0)],
            scores: vec![("queue-scorer", vec![1.0, 0.5, 0.0])],
            want: Want::Targets(vec![0]),
            ..Case::default()
        },
        Case {
            name: "queue-scorer: all equal score 1 and the pick is random among them",
            config: one_scorer("queue-scorer"),
            pods: vec![pod(3, 0.0), pod(3, 0.0), pod(3, 0.0)],
            scores: vec![("queue-scorer", vec![1.0, 1.0, 1.0])],
            want: Want::OneOf(vec![0, 1, 2]),
            ..Case::default()
        },
        Case {
            name: "running-requests-size-scorer",
            config: one_scorer("running-requests-size-scorer"),
            pods: vec![
                pod(0, 0.0).running(3),
                pod(0, 0.0).running(1),
                pod(0, 0.0).running(2),
            ],
            scores: vec![("running-requests-size-scorer", vec![0.0, 1.0, 0.5])],
            want: Want::Targets(vec![1]),
            ..Case::default()
        },
        Case {
            name: "kv-cache-utilization-scorer: 1 - usage",
            config: one_scorer("kv-cache-utilization-scorer"),
            pods: vec![pod(0, 0.25), pod(0, 0.5), pod(0, 1.0)],
            scores: vec![("kv-cache-utilization-scorer", vec![0.75, 0.5, 0.0])],
            want: Want::Targets(vec![0]),
            ..Case::default()
        },
        Case {
            name: "lora-affinity-scorer: active 1, room 0.8, waiting 0.6, else 0",
            config: one_scorer("lora-affinity-scorer"),
            pods: vec![
                pod(0, 0.0).active(&["x", LORA]).max_lora(2),
                pod(0, 0.0).active(&["x"]).max_lora(4),
                pod(0, 0.0).active(&["x"]).waiting(&[LORA]).max_lora(2),
                pod(0, 0.0).active(&["x", "y"]).max_lora(2),
            ],
            model: LORA,
            scores: vec![("lora-affinity-scorer", vec![1.0, 0.8, 0.6, 0.0])],
            want: Want::Targets(vec![0]),
            ..Case::default()
        },
        Case {
            name: "token-load-scorer: 1 - min(1, in-flight tokens / threshold)",
            config: "plugins: [{type: token-load-scorer, parameters: {queueThresholdTokens: 1000}}]",
            pods: vec![
                pod(0, 0.0).in_flight(1, 2000),
                pod(0, 0.0).in_flight(1, 500),
                pod(0, 0.0).in_flight(0, 0),
            ],
            scores: vec![("token-load-scorer", vec![0.0, 0.5, 1.0])],
            want: Want::Targets(vec![2]),
            ..Case::default()
        },
        Case {
            name: "session-affinity-scorer: the session's endpoint scores 1",
            config: one_scorer("session-affinity-scorer"),
            pods: vec![pod(0, 0.0), pod(0, 0.0), pod(0, 0.0)],
            headers: vec![(
                "X-Session-Token",
                sluice_scheduling::plugins::SessionAffinityScorer::token_for(&endpoint(2).key),
            )],
            scores: vec![("session-affinity-scorer", vec![0.0, 0.0, 1.0])],
            want: Want::Targets(vec![2]),
            ..Case::default()
        },
        Case {
            name: "session-affinity-scorer: a garbage token scores nobody",
            config: one_scorer("session-affinity-scorer"),
            pods: vec![pod(0, 0.0), pod(0, 0.0)],
            headers: vec![("x-session-token", "not base64!".into())],
            scores: vec![("session-affinity-scorer", vec![0.0, 0.0])],
            want: Want::OneOf(vec![0, 1]),
            ..Case::default()
        },
        // ---- prefix cache ----
        Case {
            name: "prefix-cache-scorer: half a prefix hit (0.5) does not outweigh a queue advantage (1.0)",
            config: "plugins: [{type: prefix-cache-scorer, parameters: {autoTune: false}}, {type: queue-scorer}]",
            pods: vec![pod(0, 0.0), pod(1, 0.0), pod(1, 0.0)],
            // Pod 2 saw the first 10 of the request's 20 blocks.
            warmup: vec![(2, prompt('a', 10))],
            prompt: prompt('a', 10) + &prompt('b', 10),
            scores: vec![
                ("prefix-cache-scorer", vec![0.0, 0.0, 0.5]),
                ("queue-scorer", vec![1.0, 0.0, 0.0]),
            ],
            want: Want::Targets(vec![0]),
            ..Case::default()
        },
        Case {
            name: "prefix-cache-scorer prefers the server that saw the prefix (equal load)",
            config: "plugins: [{type: prefix-cache-scorer, parameters: {autoTune: false}}, {type: queue-scorer}]",
            pods: vec![pod(2, 0.0), pod(2, 0.0), pod(2, 0.0)],
            warmup: vec![(1, prompt('a', 10)), (2, prompt('a', 5))],
            prompt: prompt('a', 10) + &prompt('b', 10),
            scores: vec![("prefix-cache-scorer", vec![0.0, 0.5, 0.25])],
            want: Want::Targets(vec![1]),
            ..Case::default()
        },
        Case {
            name: "prefix-cache-scorer: another model does not share the cache",
            config: "plugins: [{type: prefix-cache-scorer, parameters: {autoTune: false}}]",
            pods: vec![pod(0, 0.0), pod(0, 0.0)],
            model: "other-model",
            warmup: vec![(1, prompt('a', 10))],
            prompt: prompt('a', 10),
            scores: vec![("prefix-cache-scorer", vec![0.0, 0.0])],
            want: Want::OneOf(vec![0, 1]),
            ..Case::default()
        },
        Case {
            name: "prefix-cache-scorer: auto-tuned block size from metrics changes the blocks",
            config: "plugins: [{type: prefix-cache-scorer}]",
            pods: vec![
                Pod {
                    block_size: 32,
                    ..pod(0, 0.0)
                },
                Pod {
                    block_size: 32,
                    ..pod(0, 0.0)
                },
            ],
            // 20 blocks of 64 chars = 10 blocks of 128 chars; warmed with the first 5.
            warmup: vec![(0, prompt('a', 10))],
            prompt: prompt('a', 20),
            scores: vec![("prefix-cache-scorer", vec![0.5, 0.0])],
            want: Want::Targets(vec![0]),
            ..Case::default()
        },
        Case {
            name: "approx-prefix-cache-producer (llm-d style, declared) feeds the prefix scorer",
            config: "plugins: [{type: approx-prefix-cache-producer, parameters: {autoTune: false, blockSizeTokens: 32}}, {type: prefix-cache-scorer, parameters: {autoTune: false}}]\n\
                     schedulingProfiles: [{name: default, plugins: [{pluginRef: prefix-cache-scorer}]}]",
            pods: vec![pod(0, 0.0), pod(0, 0.0)],
            // 128-character blocks from the producer's parameters: 5 of 10 held by pod 0.
            warmup: vec![(0, prompt('a', 10))],
            prompt: prompt('a', 20),
            scores: vec![("prefix-cache-scorer", vec![0.5, 0.0])],
            want: Want::Targets(vec![0]),
            ..Case::default()
        },
        Case {
            name: "token-load-scorer with inflight-load-producer declared (default threshold 4194304)",
            config: "plugins: [{type: inflight-load-producer}, {type: token-load-scorer}]\n\
                     schedulingProfiles: [{name: default, plugins: [{pluginRef: inflight-load-producer}, {pluginRef: token-load-scorer}]}]",
            pods: vec![
                pod(0, 0.0).in_flight(3, 2_097_152),
                pod(0, 0.0).in_flight(1, 4_194_304 * 2),
            ],
            scores: vec![("token-load-scorer", vec![0.5, 0.0])],
            want: Want::Targets(vec![0]),
            ..Case::default()
        },
        // ---- filters ----
        Case {
            name: "header-based-testing-filter: ip:port selects exactly that endpoint",
            config: "plugins: [{type: header-based-testing-filter}]",
            pods: vec![pod(0, 0.0), pod(0, 0.0), pod(0, 0.0)],
            headers: vec![("test-epp-endpoint-selection", "192.168.1.3:8000".into())],
            survivors: Some(vec![2]),
            want: Want::Targets(vec![2]),
            ..Case::default()
        },
        Case {
            name: "header-based-testing-filter: bare IPs, de-duplicated, header order",
            config: "plugins: [{type: header-based-testing-filter}]",
            pods: vec![pod(0, 0.0), pod(0, 0.0), pod(0, 0.0)],
            headers: vec![(
                "test-epp-endpoint-selection",
                " 192.168.1.2, 192.168.1.1 ,192.168.1.2:8000,10.0.0.1".into(),
            )],
            survivors: Some(vec![0, 1]),
            want: Want::OneOf(vec![0, 1]),
            ..Case::default()
        },
        Case {
            name: "header-based-testing-filter: no header ⇒ nothing left ⇒ 503",
            config: "plugins: [{type: header-based-testing-filter}]",
            pods: vec![pod(0, 0.0), pod(0, 0.0)],
            want: Want::Status(503),
            ..Case::default()
        },
        Case {
            name: "utilization-detector filter keeps endpoints under the thresholds",
            config: "plugins: [{type: utilization-detector}, {type: queue-scorer}]",
            pods: vec![
                pod(6, 0.2),
                pod(0, 0.1),
                pod(4, 0.85),
                pod(1, 0.1).age_ms(500),
                pod(0, 0.0).no_metrics(),
            ],
            survivors: Some(vec![1]),
            want: Want::Targets(vec![1]),
            ..Case::default()
        },
        Case {
            name: "utilization-detector filter fails open when every endpoint is saturated",
            config: "plugins: [{type: utilization-detector}, {type: queue-scorer}]",
            pods: vec![pod(6, 0.2), pod(0, 0.85), pod(10, 0.9)],
            survivors: Some(vec![0, 1, 2]),
            want: Want::Targets(vec![1]),
            ..Case::default()
        },
        Case {
            name: "utilization-detector headroom admits endpoints slightly over",
            config: "plugins: [{type: utilization-detector, parameters: {headroom: 0.3}}, {type: queue-scorer}]",
            pods: vec![pod(6, 0.2), pod(7, 0.2)],
            survivors: Some(vec![0]),
            want: Want::Targets(vec![0]),
            ..Case::default()
        },
        Case {
            name: "concurrency-detector filter keeps endpoints below maxConcurrency",
            config: "plugins: [{type: concurrency-detector, parameters: {maxConcurrency: 10}}]",
            pods: vec![
                pod(0, 0.0).in_flight(10, 0),
                pod(0, 0.0).in_flight(9, 0),
                pod(0, 0.0).in_flight(12, 0),
            ],
            survivors: Some(vec![1]),
            want: Want::Targets(vec![1]),
            ..Case::default()
        },
        Case {
            name: "concurrency-detector filter fails open",
            config: "plugins: [{type: concurrency-detector, parameters: {maxConcurrency: 10}}]",
            pods: vec![pod(0, 0.0).in_flight(10, 0), pod(0, 0.0).in_flight(11, 0)],
            survivors: Some(vec![0, 1]),
            want: Want::OneOf(vec![0, 1]),
            ..Case::default()
        },
        Case {
            name: "concurrency-detector in token mode",
            config: "plugins: [{type: concurrency-detector, parameters: {concurrencyMode: tokens, maxTokenConcurrency: 100}}]",
            pods: vec![pod(0, 0.0).in_flight(0, 100), pod(0, 0.0).in_flight(50, 99)],
            survivors: Some(vec![1]),
            want: Want::Targets(vec![1]),
            ..Case::default()
        },
        // ---- pickers ----
        Case {
            name: "max-score-picker with fallbacks returns the best first",
            config: "plugins: [{type: queue-scorer}, {type: max-score-picker, parameters: {maxNumOfEndpoints: 3}}]",
            pods: vec![pod(5, 0.0), pod(0, 0.0), pod(10, 0.0), pod(2, 0.0)],
            want: Want::Targets(vec![1, 3, 0]),
            ..Case::default()
        },
        Case {
            name: "maxNumOfEndpoints larger than the pool returns everything",
            config: "plugins: [{type: queue-scorer}, {type: max-score-picker, parameters: {maxNumOfEndpoints: 9}}]",
            pods: vec![pod(5, 0.0), pod(0, 0.0)],
            want: Want::Targets(vec![1, 0]),
            ..Case::default()
        },
        Case {
            name: "weighted-random-picker never picks a zero score when others are positive",
            config: "plugins: [{type: kv-cache-utilization-scorer}, {type: weighted-random-picker, parameters: {maxNumOfEndpoints: 2}}]",
            pods: vec![pod(0, 1.0), pod(0, 0.5), pod(0, 0.2)],
            want: Want::OneOf(vec![1, 2]),
            ..Case::default()
        },
        // ---- the default (no config) ----
        Case {
            name: "no config: queue 2, kv 2, prefix 3",
            config: "",
            pods: vec![pod(3, 0.2), pod(0, 0.1), pod(10, 0.2)],
            scores: vec![
                ("queue-scorer", vec![0.7, 1.0, 0.0]),
                ("kv-cache-utilization-scorer", vec![0.8, 0.9, 0.8]),
            ],
            want: Want::Targets(vec![1]),
            ..Case::default()
        },
    ]
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn scheduling_cases() {
    let mut failures = Vec::new();
    for case in cases() {
        if let Err(e) = run(&case) {
            failures.push(format!("{}: {e}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "failing cases:\n  {}",
        failures.join("\n  ")
    );
}

fn run(case: &Case) -> Result<(), String> {
    let s = scheduler(case.config);
    let cands = candidates(&case.pods);
    for (n, (target, prompt)) in case.warmup.iter().enumerate() {
        let mut req = request(&format!("warm-{n}"), case.model);
        req.prompt = prompt.clone().into();
        // Warm with the same model unless the row is about model separation.
        if case.name.contains("another model") {
            req.target_model = "my-model".into();
        }
        let only = &cands[*target..*target + 1];
        let mut sched = s
            .schedule(&req, only)
            .map_err(|e| format!("warmup failed: {e}"))?;
        s.pre_request(&req, &mut sched);
        s.complete(&req, &mut sched, Outcome::Success);
    }
    let mut req = request("req", case.model);
    req.prompt = case.prompt.clone().into();
    req.headers = case
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let got = s.schedule(&req, &cands);
    let sched = match (&case.want, got) {
        (Want::Status(code), Err(e)) if e.http_status() == *code => return Ok(()),
        (Want::Status(code), Err(e)) => {
            return Err(format!("want status {code}, got {e} ({})", e.http_status()));
        }
        (Want::Status(code), Ok(s)) => {
            return Err(format!(
                "want status {code}, got a pick of {:?}",
                s.result.destination_header()
            ));
        }
        (_, Err(e)) => return Err(format!("scheduling failed: {e}")),
        (_, Ok(s)) => s,
    };
    let primary = sched.result.primary().ok_or("no primary result")?;
    if let Some(want) = &case.survivors {
        let got: Vec<usize> = primary.scored.iter().map(|s| s.index).collect();
        if &got != want {
            return Err(format!("survivors: want {want:?}, got {got:?}"));
        }
    }
    for (scorer, want) in &case.scores {
        let got = primary
            .scorer_scores
            .iter()
            .find(|s| &*s.scorer == *scorer)
            .ok_or_else(|| format!("no scores recorded for {scorer}"))?;
        if got.scores.len() != want.len()
            || !got.scores.iter().zip(want).all(|(a, b)| close(*a, *b))
        {
            return Err(format!(
                "{scorer} scores: want {want:?}, got {:?}",
                got.scores
            ));
        }
    }
    let targets: Vec<usize> = sched.result.targets.iter().map(pod_index).collect();
    match &case.want {
        Want::Targets(want) if &targets != want => {
            Err(format!("targets: want {want:?}, got {targets:?}"))
        }
        Want::OneOf(allowed) if !targets.first().is_some_and(|t| allowed.contains(t)) => {
            Err(format!("pick: want one of {allowed:?}, got {targets:?}"))
        }
        _ => Ok(()),
    }
}

#[test]
fn no_candidates_is_503() {
    let s = scheduler(INTEGRATION_CONFIG);
    let err = s.schedule(&request("r", "m"), &[]).unwrap_err();
    assert_eq!(err, ScheduleError::NoCandidates);
    assert_eq!(err.http_status(), 503);
}
