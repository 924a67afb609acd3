//! `cargo xtask bench-controller`: config propagation p50/p99 for 1/10/50 pickers and pools of
//! 10/1,000 pods, and the controller's memory with 10,000 pods indexed. Runs the criterion
//! bench `sluice-controller/benches/propagation.rs` and prints its summary lines.

// The report is the product of this tool: it goes to stdout.
#![allow(clippy::print_stdout)]

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// Runs the controller bench from the workspace `root`.
pub fn run(root: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["bench", "-p", "sluice-controller", "--bench", "propagation"])
        .output()
        .context("running cargo bench -p sluice-controller --bench propagation")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "controller bench failed ({}):\n{}\n{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for line in stdout
        .lines()
        .filter(|l| l.starts_with("propagation ") || l.starts_with("memory:"))
    {
        println!("{line}");
    }
    Ok(())
}
