//! `cargo xtask bench-slo`: the SLO-aware routing benchmark.
//!
//! 1. The fleet simulation (`crates/sluice-scheduling/tests/slo_fleet.rs`, test
//!    `slo_fleet_report`): eight heterogeneous `sluice-sim` engines (3 × H100, 3 × A100,
//!    2 × L4) stepped in virtual time behind the real scheduler and SLO plugins, a
//!    three-class workload with SLO headers, a round-robin rate ladder to find where
//!    round-robin meets about half of the SLOs, then round-robin, random, the default
//!    profile and the SLO profile (`least` and `most`) side by side: attainment, goodput,
//!    TTFT/TPOT p50/p99, predictor MAPE after warm-up; a 1.5× stress point; a load sweep;
//!    and the default and SLO rows repeated over `SLO_BENCH_SEEDS` (mean and range).
//! 2. The predictor's accuracy against a known truth (`sluice-predictor` tests `accuracy`
//!    and `engine_accuracy`): MAPE against the noiseless latency function the samples were
//!    drawn from, and against the noisy observations, beside the fleet's MAPE against
//!    outcomes (which includes what arrives after dispatch and no predictor can see).
//! 3. The predictor micro-benchmark (criterion, `sluice-predictor --bench predictor`,
//!    group `predict_100_endpoints`): one batch prediction for 100 endpoints.
//!
//! It runs twice, once per workload scenario (`SLO_BENCH_SCENARIO=balanced|tiered` runs one):
//! `balanced` (chat 500/50 ms, rag 1500/80, batch 4000/150 sheddable) and `tiered`
//! (premium 300/20 ms, standard 1000/80, batch 4000/150 sheddable), where a premium request
//! meets its 20 ms inter-token SLO only on an H100's short decode step.
//!
//! Settings pass through the environment: `SLO_BENCH_SECONDS`, `SLO_BENCH_WARMUP`,
//! `SLO_BENCH_RATE` (skips the ladder), `SLO_BENCH_SEED`, `SLO_BENCH_BUFFER`
//! (`sloBufferFactor`), `SLO_BENCH_DUMP=DIR` (features, predictions and outcomes as CSV),
//! `SLO_BENCH_PREDICTOR_ONLY=1` (only the SLO rows and the predictor's MAPE and coverage),
//! `SLO_BENCH_TTFT_TREES` / `SLO_BENCH_TPOT_TREES` (boosted trees per target),
//! `SLO_BENCH_FLEET=two|mixed` (4 × H100 + 4 × A100, or 2 × H100 + 2 × A100 + 4 × L4),
//! `SLO_BENCH_PREMIUM` (the premium share of the `tiered` scenario, default 0.3).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs the benchmark. `quick` builds the simulation with the dev profile (the simulated
/// figures are identical because they are in virtual time; only the wall-time columns
/// change) and skips the criterion micro-benchmark, which needs an optimised build.
pub fn run(root: &Path, quick: bool) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Both workload scenarios unless the caller chose one.
    let scenarios = match std::env::var("SLO_BENCH_SCENARIO") {
        Ok(s) => vec![s],
        Err(_) => vec!["balanced".to_owned(), "tiered".to_owned()],
    };
    for scenario in scenarios {
        eprintln!("\nxtask: bench-slo scenario {scenario}");
        let mut sim = Command::new(&cargo);
        sim.current_dir(root)
            .env("SLO_BENCH_SCENARIO", &scenario)
            .args(["test", "-p", "sluice-scheduling", "--test", "slo_fleet"]);
        if !quick {
            sim.arg("--release");
        }
        sim.args([
            "--",
            "slo_fleet_report",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ]);
        run_cmd(&mut sim)?;
    }
    eprintln!("\nxtask: bench-slo predictor accuracy against a known truth");
    let mut accuracy = Command::new(&cargo);
    accuracy
        .current_dir(root)
        .args(["test", "-p", "sluice-predictor"]);
    if !quick {
        accuracy.arg("--release");
    }
    accuracy.args([
        "--test",
        "accuracy",
        "--test",
        "engine_accuracy",
        "--",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    run_cmd(&mut accuracy)?;
    if !quick {
        let mut micro = Command::new(&cargo);
        micro.current_dir(root).args([
            "bench",
            "-p",
            "sluice-predictor",
            "--bench",
            "predictor",
            "--",
            "predict_100_endpoints",
        ]);
        run_cmd(&mut micro)?;
    }
    Ok(())
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
