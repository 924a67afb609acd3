//! `cargo xtask bench-flow`: the end-to-end flow-control benchmark on the simulated fleet.
//!
//! Runs the `fleet` bench target of sluice-flowcontrol, which steps sluice-sim engines in
//! tokio's paused clock with a noisy low-criticality workload past saturation next to a quiet
//! critical one, and prints per workload p50/p99 TTFT, goodput and rejected share with flow
//! control off and on. Settings can be changed with `FLOW_BENCH_*` environment variables
//! (`PRESET`, `SERVERS`, `SECONDS`, `TTL_S`, `NOISY_RPS`, `QUIET_RPS`, `SEED`).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs the benchmark. `quick` uses the dev profile (no optimised build, same simulation;
/// the report is identical because simulated time does not depend on build speed).
pub fn run(root: &Path, quick: bool) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["bench", "-p", "sluice-flowcontrol", "--bench", "fleet"]);
    if quick {
        cmd.args(["--profile", "dev"]);
    }
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
