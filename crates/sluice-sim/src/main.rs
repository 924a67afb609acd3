//! `sluice-sim`: simulated vLLM servers and a load generator. See `docs/simulator.md`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sluice_sim::fleet::FleetConfig;
use sluice_sim::load::{self, LoadConfig};
use sluice_sim::metrics::EngineFlavor;
use sluice_sim::preset::{Overrides, Preset};
use sluice_sim::server::{self, Faults, ServerConfig};
use sluice_sim::workload::Workload;
use sluice_sim::{EngineConfig, fleet};

#[derive(Parser, Debug)]
#[command(
    name = "sluice-sim",
    version,
    about = "Simulated vLLM servers and an OpenAI load generator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one simulated server.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// Port (0 picks a free one).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Engine preset.
        #[arg(long, default_value = "h100-llama8b")]
        preset: Preset,
        /// Name reported in the `x-sim-server` header.
        #[arg(long, default_value = "sim-0")]
        name: String,
    },
    /// Run N simulated servers in one process (ports base-port .. base-port+N-1).
    Fleet {
        #[command(flatten)]
        common: Common,
        /// Number of servers.
        #[arg(long, short = 'n', default_value_t = 4)]
        servers: usize,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// First port (0 picks free ports).
        #[arg(long, default_value_t = 8000)]
        base_port: u16,
        /// Presets assigned round-robin, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "h100-llama8b")]
        presets: Vec<Preset>,
    },
    /// Drive a server, a fleet or a gateway with a workload file.
    Load {
        /// Base URL; repeat to spread requests round-robin over several servers.
        #[arg(long = "target", required = true)]
        targets: Vec<String>,
        /// Workload YAML file (see `workloads/`).
        #[arg(long)]
        workload: PathBuf,
        /// The target's time scale (simulated seconds per wall second).
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// Model name when the workload names none.
        #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
        model: String,
        /// Per-request records as JSON lines.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Print the summary as JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Open-loop arrivals beyond this many in flight are dropped and counted as errors.
        #[arg(long, default_value_t = 10_000)]
        max_in_flight: usize,
        /// Deadline on a whole request in wall-clock seconds, however steadily it streams.
        #[arg(long, default_value_t = 600.0)]
        timeout_s: f64,
        /// A request fails when the server sends nothing for this many wall-clock seconds
        /// (no head, no body byte); a slow answer that keeps streaming is not cut off.
        #[arg(long, default_value_t = 120.0)]
        stall_timeout_s: f64,
    },
    /// Measure: an in-process fleet plus the load generator at a fixed request rate.
    Bench {
        #[command(flatten)]
        common: Common,
        /// Number of servers.
        #[arg(long, default_value_t = 32)]
        servers: usize,
        /// Presets assigned round-robin.
        #[arg(long, value_delimiter = ',', default_value = "h100-llama8b")]
        presets: Vec<Preset>,
        /// Offered load, requests per simulated second (Poisson).
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Simulated seconds.
        #[arg(long, default_value_t = 10.0)]
        duration_s: f64,
        /// Prompt tokens per request.
        #[arg(long, default_value_t = 256)]
        prompt_tokens: u32,
        /// Output tokens per request.
        #[arg(long, default_value_t = 32)]
        output_tokens: u32,
        /// Stream answers (SSE).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        stream: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the presets as JSON.
    Presets,
}

/// Settings shared by every server.
#[derive(Args, Debug, Clone)]
struct Common {
    /// Simulated seconds per wall second (10 = ten times faster than real time).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Seed for every random draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Metric names of this engine.
    #[arg(long, value_enum, default_value = "vllm")]
    engine: EngineFlavor,
    /// Override the served model name.
    #[arg(long)]
    model: Option<String>,
    /// Override the number of KV blocks.
    #[arg(long)]
    num_gpu_blocks: Option<u32>,
    /// Override `max_num_seqs`.
    #[arg(long)]
    max_num_seqs: Option<u32>,
    /// Override `max_num_batched_tokens`.
    #[arg(long)]
    max_num_batched_tokens: Option<u32>,
    /// Override `max_loras`.
    #[arg(long)]
    max_loras: Option<u32>,
    /// LoRA adapters served (comma separated); replaces the preset's list.
    #[arg(long, value_delimiter = ',')]
    lora_modules: Option<Vec<String>>,
    /// Disable automatic prefix caching.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Share of requests answered with a 5xx.
    #[arg(long, default_value_t = 0.0)]
    fault_error_rate: f64,
    /// Status of injected errors.
    #[arg(long, default_value_t = 500)]
    fault_error_status: u16,
    /// Share of requests that hang.
    #[arg(long, default_value_t = 0.0)]
    fault_hang_rate: f64,
    /// How long a hung request is held, ms.
    #[arg(long, default_value_t = 300_000)]
    fault_hang_ms: u64,
    /// Share of streams cut mid-way.
    #[arg(long, default_value_t = 0.0)]
    fault_drop_rate: f64,
    /// Delay on `/metrics`, ms.
    #[arg(long, default_value_t = 0)]
    fault_metrics_delay_ms: u64,
    /// Serve garbage on `/metrics`.
    #[arg(long)]
    fault_metrics_garbage: bool,
}

impl Common {
    fn overrides(&self) -> Overrides {
        Overrides {
            model: self.model.clone(),
            num_gpu_blocks: self.num_gpu_blocks,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_loras: self.max_loras,
            lora_adapters: self.lora_modules.clone(),
            no_prefix_caching: self.no_prefix_caching,
        }
    }

    fn engine(&self, preset: Preset) -> EngineConfig {
        let mut e = preset.config();
        self.overrides().apply(&mut e);
        e
    }

    fn faults(&self) -> Faults {
        Faults {
            error_rate: self.fault_error_rate,
            error_status: self.fault_error_status,
            hang_rate: self.fault_hang_rate,
            hang_ms: self.fault_hang_ms,
            drop_rate: self.fault_drop_rate,
            metrics_delay_ms: self.fault_metrics_delay_ms,
            metrics_garbage: self.fault_metrics_garbage,
        }
    }

    fn fleet(
        &self,
        n: usize,
        presets: &[Preset],
        host: IpAddr,
        base_port: Option<u16>,
    ) -> FleetConfig {
        let mut f = FleetConfig::new(n, presets);
        f.host = host;
        f.base_port = base_port;
        f.time_scale = self.time_scale;
        f.seed = self.seed;
        f.flavor = self.engine;
        f.faults = self.faults();
        f.overrides = self.overrides();
        f
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli.cmd))
}

#[allow(clippy::print_stdout)] // stdout is this tool's output channel
async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Serve {
            common,
            host,
            port,
            preset,
            name,
        } => {
            let mut c = ServerConfig::new(name, common.engine(preset));
            c.bind = SocketAddr::new(host, port);
            c.time_scale = common.time_scale;
            c.seed = common.seed;
            c.flavor = common.engine;
            c.faults = common.faults();
            let h = server::spawn(c).await?;
            println!("{} {} {}", h.name, h.base_url(), preset);
            tokio::signal::ctrl_c().await?;
            h.shutdown().await;
        }
        Cmd::Fleet {
            common,
            servers,
            host,
            base_port,
            presets,
        } => {
            let cfg = common.fleet(
                servers,
                &presets,
                host,
                (base_port != 0).then_some(base_port),
            );
            let hs = fleet::spawn_with(&cfg).await?;
            for (i, h) in hs.iter().enumerate() {
                println!(
                    "{} {} {}",
                    h.name,
                    h.base_url(),
                    cfg.presets[i % cfg.presets.len()]
                );
            }
            tokio::signal::ctrl_c().await?;
            for h in hs {
                h.shutdown().await;
            }
        }
        Cmd::Load {
            targets,
            workload,
            time_scale,
            model,
            output,
            json,
            max_in_flight,
            timeout_s,
            stall_timeout_s,
        } => {
            let text = std::fs::read_to_string(&workload)
                .with_context(|| format!("cannot read workload file {}", workload.display()))?;
            let w = Workload::from_yaml(&text, &workload.display().to_string())?;
            let mut cfg = LoadConfig::new(targets, w);
            cfg.time_scale = time_scale;
            cfg.default_model = model;
            cfg.output = output;
            cfg.max_in_flight = max_in_flight;
            cfg.timeout = positive_seconds("--timeout-s", timeout_s)?;
            cfg.stall_timeout = positive_seconds("--stall-timeout-s", stall_timeout_s)?;
            // On a worker thread, where the arrival timers fire (see `bench::run`).
            let s = tokio::spawn(load::run(cfg))
                .await
                .map_err(|e| anyhow::anyhow!("the load generator task failed: {e}"))??;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.render());
            }
        }
        Cmd::Bench {
            common,
            servers,
            presets,
            rate,
            duration_s,
            prompt_tokens,
            output_tokens,
            stream,
            json,
        } => {
            let cfg = common.fleet(servers, &presets, IpAddr::from([127, 0, 0, 1]), None);
            let bench = sluice_sim::bench::BenchConfig {
                rate,
                duration_s,
                prompt_tokens,
                output_tokens,
                stream,
            };
            let report = sluice_sim::bench::run(&cfg, &bench).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
        }
        Cmd::Presets => {
            let all: Vec<_> = Preset::ALL
                .iter()
                .map(|p| serde_json::json!({"name": p.name(), "config": p.config()}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
    }
    Ok(())
}

/// `secs` as a duration, or an error naming `flag` when it is not a positive number.
fn positive_seconds(flag: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("{flag} must be a positive number of seconds, got {secs}"))
}
