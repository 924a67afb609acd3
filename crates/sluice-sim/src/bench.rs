//! The fleet throughput measurement behind `sluice-sim bench`: an in-process fleet, the load
//! generator spreading a Poisson stream round-robin over every server, and the summary.

use crate::fleet::{self, FleetConfig};
use crate::load::{self, LoadConfig, Summary};
use crate::workload::{ApiKind, Arrival, Class, Dist, Slo, Workload};

/// Runs `rate` requests per simulated second for `duration_s` simulated seconds against a
/// fleet built from `cfg`, and returns the load summary (`wall_s` tells how long it took).
pub async fn run(
    cfg: &FleetConfig,
    rate: f64,
    duration_s: f64,
    prompt_tokens: u32,
    output_tokens: u32,
    stream: bool,
) -> anyhow::Result<Summary> {
    // One pool serves one model name, whatever GPUs its servers run on.
    let mut cfg = cfg.clone();
    let model = cfg
        .overrides
        .model
        .get_or_insert_with(|| {
            cfg.presets
                .first()
                .copied()
                .unwrap_or(crate::Preset::H100Llama8b)
                .config()
                .model
        })
        .clone();
    let handles = fleet::spawn_with(&cfg).await?;
    let workload = Workload {
        name: format!("bench-{}x{rate}", cfg.n),
        seed: cfg.seed,
        model: None,
        duration_s,
        arrival: Arrival::Poisson {
            rate,
            stages: Vec::new(),
        },
        classes: vec![Class {
            name: "bench".into(),
            weight: 1.0,
            api: ApiKind::Completions,
            stream,
            ignore_eos: true,
            prompt: Dist::Fixed {
                value: prompt_tokens,
            },
            output: Dist::Fixed {
                value: output_tokens,
            },
            shared_prefix: None,
            lora: None,
            model: None,
            slo: Slo::default(),
            objective: None,
            workload: None,
            headers: Default::default(),
        }],
    };
    let mut lc = LoadConfig::new(handles.iter().map(|h| h.base_url()).collect(), workload);
    lc.time_scale = cfg.time_scale;
    lc.default_model = model;
    // In process, every request in flight holds two sockets (client and server side); past this
    // bound an overloaded run counts dropped arrivals instead of exhausting file descriptors.
    lc.max_in_flight = 4096;
    let summary = load::run(lc).await;
    for h in handles {
        h.shutdown().await;
    }
    summary
}
