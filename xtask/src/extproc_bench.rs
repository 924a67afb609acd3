//! `cargo xtask bench-extproc`: sluice-picker against a do-nothing ext_proc processor (the
//! floor of `extproc-floor.md`), both behind their own Envoy (FULL_DUPLEX_STREAMED, one
//! worker, plaintext gRPC) in front of the same simulated fleet, measured side by side and
//! alternating: rate, p50 and p99 at each concurrency, and each processor's CPU per request
//! (from `/proc/<pid>/stat`). Then sluice-picker alone, pinned to one core, driven over gRPC
//! without Envoy.
//!
//! The floor sends requests to the same endpoints in turn (round-robin per stream), so the
//! Envoy upstream pools and the simulated engines do the same spread of work in both
//! set-ups: with one fixed endpoint, the floor's single engine batched every request in one
//! step loop while the picker's traffic woke eight, and the difference in simulator CPU was
//! charged to the picker's rate. Envoy's and the simulator's CPU per request are reported too.
//!
//! The picker is stopped (SIGSTOP) during the floor's cells: its background scraping, and the
//! simulators answering it, are the picker's cost and must not slow the floor's runs.

// The report is the product of this tool: it goes to stdout.
#![allow(clippy::print_stdout)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::proc::{Proc, free_port, free_port_run};

/// Options for the bench.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Seconds per measured cell.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Alternating rounds (floor, sluice, floor, sluice, ...).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// Simulated endpoints behind sluice-picker.
    #[arg(long, default_value_t = 8)]
    pub endpoints: usize,
    /// Skip `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
    /// Tokio worker threads of both processors (the floor and sluice-picker get the same);
    /// 0 = their own default, one per CPU. The default is 1: this bench runs Envoy, the
    /// simulated fleet and the load generator on the same machine, and a processor with
    /// more workers than that leaves measures the machine's contention more than the
    /// processor (on 2 cores the floor itself serves ~10 % more with one worker).
    #[arg(long, default_value_t = 1)]
    pub worker_threads: u16,
    /// A floor variant that also sends parts of sluice-picker's routing answer
    /// (`metadata`, `content-length`, comma-separated), to measure what they cost Envoy.
    /// Default: none, the do-nothing floor of extproc-floor.md.
    #[arg(long, value_delimiter = ',')]
    pub floor_like_sluice: Vec<String>,
}

impl Proc {
    /// CPU seconds (user + system) used so far.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        ticks / 100.0
    }
}

impl Proc {
    /// Stops (`STOP`) or resumes (`CONT`) the process, so that an idle contender's
    /// background work (the picker's 20 scrapes/s per endpoint, and the simulators
    /// answering them) is not charged to the other side's cells.
    fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{sig} {} failed: {status}", self.name);
        }
        Ok(())
    }
}

fn wait_port(addr: SocketAddr, procs: &mut [&mut Proc], what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        for p in procs.iter_mut() {
            p.check()?;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out waiting for {what} on {addr}")
}

fn envoy_ready(admin: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(
        s,
        "GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut b = String::new();
    let _ = s.read_to_string(&mut b);
    b.contains("LIVE")
}

#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_req: f64,
    envoy_cpu_us_per_req: f64,
    sim_cpu_us_per_req: f64,
    errors: f64,
}

fn drive(
    bench: &Path,
    url: &str,
    conc: usize,
    secs: f64,
    model: &str,
    [proc_, envoy, sim]: [&Proc; 3],
) -> Result<Cell> {
    let cpu0 = proc_.cpu_seconds();
    let (envoy0, sim0) = (envoy.cpu_seconds(), sim.cpu_seconds());
    let out = Command::new(bench)
        .args([
            "http",
            "--url",
            url,
            "--concurrency",
            &conc.to_string(),
            "--duration",
            &secs.to_string(),
        ])
        .args(["--model", model])
        .output()
        .context("running the HTTP driver")?;
    let cpu1 = proc_.cpu_seconds();
    let (envoy1, sim1) = (envoy.cpu_seconds(), sim.cpu_seconds());
    if !out.status.success() {
        bail!(
            "HTTP driver failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("driver output")?;
    let n = v["requests"].as_f64().unwrap_or(0.0);
    let per_req = |seconds: f64| {
        if n > 0.0 { seconds * 1e6 / n } else { f64::NAN }
    };
    Ok(Cell {
        rps: v["rps"].as_f64().unwrap_or(0.0),
        p50_ms: v["p50_ms"].as_f64().unwrap_or(f64::NAN),
        p99_ms: v["p99_ms"].as_f64().unwrap_or(f64::NAN),
        cpu_us_per_req: per_req(cpu1 - cpu0),
        envoy_cpu_us_per_req: per_req(envoy1 - envoy0),
        sim_cpu_us_per_req: per_req(sim1 - sim0),
        errors: v["errors"].as_f64().unwrap_or(0.0),
    })
}

fn mean(cells: &[Cell]) -> Cell {
    let n = cells.len().max(1) as f64;
    let s = |f: fn(&Cell) -> f64| cells.iter().map(f).sum::<f64>() / n;
    Cell {
        rps: s(|c| c.rps),
        p50_ms: s(|c| c.p50_ms),
        p99_ms: s(|c| c.p99_ms),
        cpu_us_per_req: s(|c| c.cpu_us_per_req),
        envoy_cpu_us_per_req: s(|c| c.envoy_cpu_us_per_req),
        sim_cpu_us_per_req: s(|c| c.sim_cpu_us_per_req),
        errors: s(|c| c.errors),
    }
}

/// sluice-picker in standalone mode on loopback, plaintext, over `eps`, serving ext_proc on
/// `grpc_port` (health and metrics on free ports).
fn picker_args<'c>(
    cmd: &'c mut Command,
    eps: &[String],
    grpc_port: u16,
) -> Result<&'c mut Command> {
    cmd.args([
        "--endpoints",
        &eps.join(","),
        "--bind-address",
        "127.0.0.1",
        "--secure-serving=false",
        "--grpc-port",
        &grpc_port.to_string(),
        "--grpc-health-port",
        &free_port()?.to_string(),
        "--metrics-port",
        &free_port()?.to_string(),
    ]);
    Ok(cmd)
}

/// Runs the bench.
pub fn run(root: &Path, args: &BenchArgs) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !args.no_build {
        let status = Command::new(&cargo)
            .current_dir(root)
            .args([
                "build",
                "--release",
                "-p",
                "sluice-picker",
                "-p",
                "sluice-sim",
            ])
            .status()?;
        if !status.success() {
            bail!("cargo build --release failed");
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = |n: &str| target.join("release").join(n);
    let bench = bin("sluice-extproc-bench");
    let envoy = crate::install_envoy(root)?;
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let model = "meta-llama/Llama-3.1-8B-Instruct";

    // A fast simulator: 1000x time scale makes model latency negligible next to the proxy path.
    let base = free_port_run(args.endpoints)?;
    let mut sim = Proc::spawn(
        "sluice-sim fleet",
        Command::new(bin("sluice-sim")).args([
            "fleet",
            "-n",
            &args.endpoints.to_string(),
            "--base-port",
            &base.to_string(),
            "--time-scale",
            "1000",
        ]),
        dir.join("sim.log"),
    )?;
    let eps: Vec<String> = (0..args.endpoints as u16)
        .map(|i| format!("127.0.0.1:{}", base + i))
        .collect();
    wait_port(
        format!("127.0.0.1:{base}").parse()?,
        &mut [&mut sim],
        "the simulated fleet",
    )?;

    let (floor_port, picker_port) = (free_port()?, free_port()?);
    let threads: Vec<String> = match args.worker_threads {
        0 => Vec::new(),
        n => vec!["--worker-threads".to_string(), n.to_string()],
    };
    let floor_extra = &args.floor_like_sluice;
    let mut floor = Proc::spawn(
        "floor processor",
        Command::new(&bench)
            .args([
                "floor",
                "--port",
                &floor_port.to_string(),
                "--endpoint",
                &eps.join(","),
            ])
            .args(&threads)
            .args(
                floor_extra
                    .iter()
                    .flat_map(|e| ["--like-sluice", e.as_str()]),
            ),
        dir.join("floor.log"),
    )?;
    let mut picker = Proc::spawn(
        "sluice-picker",
        picker_args(&mut Command::new(bin("sluice-picker")), &eps, picker_port)?.args(&threads),
        dir.join("picker.log"),
    )?;
    wait_port(
        format!("127.0.0.1:{floor_port}").parse()?,
        &mut [&mut floor],
        "the floor processor",
    )?;
    wait_port(
        format!("127.0.0.1:{picker_port}").parse()?,
        &mut [&mut picker],
        "sluice-picker",
    )?;

    let start_envoy = |name: &str, extproc: u16| -> Result<(Proc, String)> {
        let (listen, admin) = (free_port()?, free_port()?);
        let cfg = dir.join(format!("envoy-{name}.yaml"));
        std::fs::write(
            &cfg,
            crate::demo::render_envoy(root, listen, admin, extproc, false, true)?,
        )?;
        let mut p = Proc::spawn(
            &format!("envoy ({name})"),
            Command::new(&envoy).arg("-c").arg(&cfg).args([
                "--use-dynamic-base-id",
                "--concurrency",
                "1",
                "-l",
                "error",
            ]),
            dir.join(format!("envoy-{name}.log")),
        )?;
        let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !envoy_ready(admin_addr) {
            p.check()?;
            if Instant::now() > deadline {
                bail!("Envoy ({name}) did not become ready");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok((p, format!("http://127.0.0.1:{listen}")))
    };
    let (envoy_floor, url_floor) = start_envoy("floor", floor_port)?;
    let (envoy_picker, url_picker) = start_envoy("sluice", picker_port)?;

    eprintln!("bench: warming up");
    drive(
        &bench,
        &url_floor,
        4,
        2.0,
        model,
        [&floor, &envoy_floor, &sim],
    )?;
    drive(
        &bench,
        &url_picker,
        4,
        2.0,
        model,
        [&picker, &envoy_picker, &sim],
    )?;

    let mut rows = Vec::new();
    // Per round, sluice against the floor run just before it: the spread of these pairs is
    // the bench's noise, which the means above hide.
    let mut rounds: Vec<(usize, Vec<(f64, f64)>)> = Vec::new();
    for &c in &args.concurrency {
        let (mut f_cells, mut s_cells) = (Vec::new(), Vec::new());
        for r in 0..args.rounds {
            eprintln!("bench: concurrency {c}, round {}", r + 1);
            picker.signal("STOP")?;
            let f = drive(
                &bench,
                &url_floor,
                c,
                args.duration,
                model,
                [&floor, &envoy_floor, &sim],
            );
            picker.signal("CONT")?;
            f_cells.push(f?);
            // Let the picker's scrapers refresh metrics that aged while it was stopped.
            std::thread::sleep(Duration::from_millis(300));
            s_cells.push(drive(
                &bench,
                &url_picker,
                c,
                args.duration,
                model,
                [&picker, &envoy_picker, &sim],
            )?);
        }
        let paired: Vec<(f64, f64)> = f_cells
            .iter()
            .zip(&s_cells)
            .map(|(f, s)| (100.0 * s.rps / f.rps, s.p50_ms - f.p50_ms))
            .collect();
        rounds.push((c, paired));
        rows.push((c, mean(&f_cells), mean(&s_cells)));
    }

    println!(
        "\nThrough Envoy 1.40 (FULL_DUPLEX_STREAMED, --concurrency 1) to {} simulated endpoints, {}s per cell, {} alternating rounds (means), processors' worker threads: {}, floor: {}:",
        args.endpoints,
        args.duration,
        args.rounds,
        match args.worker_threads {
            0 => "their default (one per CPU)".to_string(),
            n => n.to_string(),
        },
        if floor_extra.is_empty() {
            "do-nothing".to_string()
        } else {
            format!("also sends {}", floor_extra.join(" + "))
        }
    );
    println!(
        "{:>5} | {:>8} {:>8} {:>8} {:>9} | {:>8} {:>8} {:>8} {:>9} | {:>6} {:>8} {:>6}",
        "conc",
        "floor/s",
        "p50 ms",
        "p99 ms",
        "cpu us/r",
        "sluice/s",
        "p50 ms",
        "p99 ms",
        "cpu us/r",
        "rate%",
        "dp50 ms",
        "cpu x"
    );
    for (c, f, s) in &rows {
        println!(
            "{:>5} | {:>8.0} {:>8.3} {:>8.3} {:>9.1} | {:>8.0} {:>8.3} {:>8.3} {:>9.1} | {:>6.1} {:>8.3} {:>6.2}",
            c,
            f.rps,
            f.p50_ms,
            f.p99_ms,
            f.cpu_us_per_req,
            s.rps,
            s.p50_ms,
            s.p99_ms,
            s.cpu_us_per_req,
            100.0 * s.rps / f.rps,
            s.p50_ms - f.p50_ms,
            s.cpu_us_per_req / f.cpu_us_per_req
        );
        if f.errors + s.errors > 0.0 {
            println!(
                "      (errors per cell: floor {:.0}, sluice {:.0})",
                f.errors, s.errors
            );
        }
    }
    if args.rounds > 1 {
        println!(
            "\nPer round (sluice vs the floor run just before it): rate % / dp50 ms, then the median dp50"
        );
        for (c, paired) in &rounds {
            let cells: Vec<String> = paired
                .iter()
                .map(|(rate, dp50)| format!("{rate:.1} / {dp50:+.3}"))
                .collect();
            let mut d: Vec<f64> = paired.iter().map(|p| p.1).collect();
            d.sort_by(f64::total_cmp);
            let median = match d.len() {
                0 => f64::NAN,
                n if n % 2 == 1 => d[n / 2],
                n => (d[n / 2 - 1] + d[n / 2]) / 2.0,
            };
            println!("{c:>5} | {} | median {median:+.3}", cells.join("  "));
        }
    }
    println!(
        "\nCPU per request outside the processors (us; floor -> sluice): the same Envoy config and \
         simulated fleet serve both, so a difference here is work the processor's answers cause"
    );
    println!("{:>5} | {:>17} | {:>17}", "conc", "envoy", "simulator");
    for (c, f, s) in &rows {
        println!(
            "{:>5} | {:>7.1} -> {:>7.1} | {:>7.1} -> {:>7.1}",
            c,
            f.envoy_cpu_us_per_req,
            s.envoy_cpu_us_per_req,
            f.sim_cpu_us_per_req,
            s.sim_cpu_us_per_req
        );
    }
    drop(picker);

    // gRPC only: one picker pinned to one core, the driver on the other.
    let port = free_port()?;
    let pinned = Proc::spawn(
        "sluice-picker (pinned)",
        picker_args(
            Command::new("taskset")
                .args(["-c", "0"])
                .arg(bin("sluice-picker")),
            &eps,
            port,
        )?,
        dir.join("picker-pinned.log"),
    )?;
    let mut pinned = pinned;
    wait_port(
        format!("127.0.0.1:{port}").parse()?,
        &mut [&mut pinned],
        "pinned sluice-picker",
    )?;
    let cpu0 = pinned.cpu_seconds();
    let out = Command::new("taskset")
        .args(["-c", "1"])
        .arg(&bench)
        .args([
            "grpc",
            "--addr",
            &format!("http://127.0.0.1:{port}"),
            "--concurrency",
            "64",
        ])
        .args(["--duration", &args.duration.to_string(), "--model", model])
        .output()?;
    let cpu1 = pinned.cpu_seconds();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "gRPC driver output: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let n = v["requests"].as_f64().unwrap_or(0.0);
    println!(
        "\ngRPC only (no Envoy), sluice-picker pinned to 1 core, 64 concurrent streams: {:.0} requests/s, {:.1} us CPU per request, errors {}{}",
        v["rps"].as_f64().unwrap_or(0.0),
        if n > 0.0 {
            (cpu1 - cpu0) * 1e6 / n
        } else {
            f64::NAN
        },
        v["errors"],
        v["first_error"]
            .as_str()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    sim.check()?;
    Ok(())
}
