//! `cargo xtask demo`: builds the release binaries, starts a simulated fleet, sluice-picker
//! (standalone mode, TLS on its gRPC port) and Envoy on free loopback ports, drives a mixed
//! workload through Envoy with `sluice-sim load`, and prints the load generator's summary
//! (requests, goodput, TTFT/TPOT percentiles, requests per endpoint) plus the picker's view.

// The report is the product of this tool: it goes to stdout.
#![allow(clippy::print_stdout)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Options for the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Simulated model servers.
    #[arg(long, default_value_t = 4)]
    pub servers: usize,
    /// Workload file driven through Envoy.
    #[arg(long, default_value = "workloads/multi-tenant.yaml")]
    pub workload: PathBuf,
    /// Skip `cargo build --release` (use binaries already in target/release).
    #[arg(long)]
    pub no_build: bool,
}

/// A child process killed when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        let f =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let f2 = f.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc { name, child, log })
    }

    fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "{} exited with {status}; last log lines:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `n` consecutive free ports (the sim fleet binds base..base+n).
fn free_port_run(n: usize) -> Result<u16> {
    for _ in 0..200 {
        let base = free_port()?;
        if base as usize + n >= 65535 {
            continue;
        }
        let held: std::io::Result<Vec<TcpListener>> = (0..n as u16)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i)))
            .collect();
        if held.is_ok() {
            return Ok(base);
        }
    }
    bail!("found no {n} consecutive free loopback ports")
}

fn wait_for(
    what: &str,
    timeout: Duration,
    procs: &mut [&mut Proc],
    mut ok: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for p in procs.iter_mut() {
            p.check()?;
        }
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf)
}

/// Renders `manifests/envoy/envoy-picker.yaml.tmpl` (full duplex, TLS to the picker).
pub fn render_envoy(
    root: &Path,
    listen: u16,
    admin: u16,
    extproc: u16,
    tls: bool,
    full_duplex: bool,
) -> Result<String> {
    let tmpl_path = root.join("manifests/envoy/envoy-picker.yaml.tmpl");
    let tmpl = std::fs::read_to_string(&tmpl_path)
        .with_context(|| format!("reading {}", tmpl_path.display()))?;
    let tls_block = if tls {
        "      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n          common_tls_context:\n            alpn_protocols: [\"h2\"]\n            validation_context: {}"
    } else {
        ""
    };
    let (body, trailers) = if full_duplex {
        ("FULL_DUPLEX_STREAMED", "SEND")
    } else {
        ("BUFFERED", "SKIP")
    };
    Ok(tmpl
        .replace("{{FAIL_OPEN_DESTINATION}}", "")
        .replace("{{ACCESS_LOG}}", "")
        .replace("{{ADMIN_PORT}}", &admin.to_string())
        .replace("{{LISTEN_PORT}}", &listen.to_string())
        .replace("{{EXTPROC_PORT}}", &extproc.to_string())
        .replace("{{FAILURE_MODE_ALLOW}}", "false")
        .replace("{{REQUEST_BODY_MODE}}", body)
        .replace("{{RESPONSE_BODY_MODE}}", body)
        .replace("{{TRAILER_MODE}}", trailers)
        .replace("{{EXTPROC_TLS}}", tls_block))
}

/// Runs the demo.
pub fn run(root: &Path, args: &DemoArgs) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !args.no_build {
        eprintln!("demo: building release binaries (sluice-picker, sluice-sim)");
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
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --release failed ({status})");
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = |name: &str| target.join("release").join(name);
    let envoy = crate::install_envoy(root)?;
    let workload = if args.workload.is_absolute() {
        args.workload.clone()
    } else {
        root.join(&args.workload)
    };
    if !workload.is_file() {
        bail!("workload {} not found", workload.display());
    }

    let run_dir = std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let base = free_port_run(args.servers)?;
    let (grpc, health, metrics, listen, admin) = (
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
    );

    let mut sim = Proc::spawn(
        "sluice-sim fleet",
        Command::new(bin("sluice-sim")).args([
            "fleet",
            "-n",
            &args.servers.to_string(),
            "--base-port",
            &base.to_string(),
        ]),
        run_dir.join("sim.log"),
    )?;
    let endpoints: Vec<String> = (0..args.servers as u16)
        .map(|i| format!("127.0.0.1:{}", base + i))
        .collect();
    let sim_addrs: Vec<SocketAddr> = endpoints.iter().filter_map(|e| e.parse().ok()).collect();
    wait_for(
        "the simulated fleet",
        Duration::from_secs(20),
        &mut [&mut sim],
        || {
            sim_addrs
                .iter()
                .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
        },
    )?;

    let mut picker = Proc::spawn(
        "sluice-picker",
        Command::new(bin("sluice-picker")).args([
            "--endpoints",
            &endpoints.join(","),
            "--bind-address",
            "127.0.0.1",
            "--grpc-port",
            &grpc.to_string(),
            "--grpc-health-port",
            &health.to_string(),
            "--metrics-port",
            &metrics.to_string(),
        ]),
        run_dir.join("picker.log"),
    )?;
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics));
    wait_for(
        "sluice-picker",
        Duration::from_secs(20),
        &mut [&mut sim, &mut picker],
        || http_get(metrics_addr, "/metrics").is_some(),
    )?;

    let envoy_cfg = run_dir.join("envoy.yaml");
    std::fs::write(
        &envoy_cfg,
        render_envoy(root, listen, admin, grpc, true, true)?,
    )?;
    let mut envoy_proc = Proc::spawn(
        "envoy",
        Command::new(&envoy).arg("-c").arg(&envoy_cfg).args([
            "--use-dynamic-base-id",
            "--concurrency",
            "1",
            "-l",
            "warning",
        ]),
        run_dir.join("envoy.log"),
    )?;
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    wait_for(
        "Envoy",
        Duration::from_secs(30),
        &mut [&mut sim, &mut picker, &mut envoy_proc],
        || http_get(admin_addr, "/ready").is_some_and(|r| r.contains("LIVE")),
    )?;

    eprintln!(
        "demo: {} simulated servers on 127.0.0.1:{base}.., sluice-picker (TLS) on :{grpc}, Envoy on :{listen}; logs in {}",
        args.servers,
        run_dir.display()
    );
    eprintln!(
        "demo: driving {} through Envoy (about a minute)",
        workload.display()
    );
    let status = Command::new(bin("sluice-sim"))
        .current_dir(root)
        .arg("load")
        .args(["--target", &format!("http://127.0.0.1:{listen}")])
        .arg("--workload")
        .arg(&workload)
        .status()
        .context("running sluice-sim load")?;
    for p in [&mut sim, &mut picker, &mut envoy_proc] {
        p.check()?;
    }
    if !status.success() {
        bail!("sluice-sim load failed ({status})");
    }
    if let Some(text) = http_get(metrics_addr, "/metrics") {
        println!("\nsluice-picker decisions (inference_extension_scheduler_attempts_total):");
        for line in text
            .lines()
            .filter(|l| l.starts_with("inference_extension_scheduler_attempts_total"))
        {
            println!("  {line}");
        }
        for prefix in [
            "sluice_picker_decision_duration_seconds_sum",
            "sluice_picker_decision_duration_seconds_count",
        ] {
            if let Some(line) = text.lines().find(|l| l.starts_with(prefix)) {
                println!("  {line}");
            }
        }
    }
    Ok(())
}
