//! `cargo xtask demo`: builds the release binaries, starts a simulated fleet (`--presets`),
//! then sluice-controller in file mode (`--manifests DIR`: an InferencePool, one Pod per
//! simulator with `status.podIP` 127.0.0.1, the active-ports annotation naming its port and
//! its hardware class as a label, an InferenceObjective, and with `--profile slo` an
//! EndpointPickerConfig for SLO-aware routing), two sluice-pickers subscribed to the controller's config stream
//! (TLS on their ext_proc ports), and one Envoy load-balancing ext_proc over both pickers, on
//! free loopback ports. It drives a mixed workload through Envoy with `sluice-sim load` and
//! prints the load generator's summary (requests, goodput, TTFT/TPOT percentiles, requests
//! per endpoint), each picker's view and the controller's.
//!
//! While it runs, edit the files in the printed manifests directory (remove a Pod, change an
//! objective, add an EndpointPickerConfig): the pickers follow within a second.

// The report is the product of this tool: it goes to stdout.
#![allow(clippy::print_stdout)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::proc::{Proc, free_port, free_port_run};

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
    /// The pickers' scheduling: `default` is upstream's default profile (queue, KV cache,
    /// prefix cache); `slo` is the predicted-latency profile (in-process latency predictor
    /// trained online from the demo's own traffic; see docs/slo-routing.md, "The demo").
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    pub profile: Profile,
    /// Simulator presets, assigned round-robin to the servers; each Pod carries its preset
    /// as its `sluice.dev/hardware-class` label. A mixed fleet is where predicted latency
    /// matters, e.g. `h100-llama8b,h100-llama8b,h100-llama8b,l4-llama8b` (the L4's decode
    /// step alone is longer than the fraud-detection class's 30 ms TPOT SLO).
    #[arg(long, value_delimiter = ',', default_value = "h100-llama8b")]
    pub presets: Vec<String>,
    /// Envoy's log levels, as its `--component-log-level` takes them (e.g.
    /// `ext_proc:debug,http:debug` to follow each request through the ext_proc filter);
    /// everything else logs warnings. The access log (one line per request) is always on.
    #[arg(long, value_name = "COMPONENT:LEVEL,...")]
    pub envoy_log: Option<String>,
}

/// How the demo's pickers schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// The predicted-latency (SLO-aware) profile.
    Slo,
    /// Upstream's default profile.
    Default,
}

/// The demo's picker config for the SLO-aware profile: the shipped SLO routing config
/// (`sluice_scheduling::plugins::slo::SLO_CONFIG_YAML`) as a resource for the pool.
const SLO_PICKER_CONFIG: &str = "apiVersion: sluice.dev/v1alpha1\nkind: EndpointPickerConfig\n\
metadata: {name: demo, namespace: default}\nspec:\n  poolRef: {name: demo}\n  plugins:\n    \
- {type: predicted-latency-profile-handler}\n    - {type: prefix-cache-scorer}\n    \
- {type: predicted-latency-scorer}\n    - {type: queue-scorer}\n    \
- {type: kv-cache-utilization-scorer}\n    - {type: weighted-random-picker}\n    \
- {type: max-score-picker}\n  schedulingProfiles:\n    - name: slo\n      plugins:\n        \
- {pluginRef: prefix-cache-scorer, weight: 0}\n        - {pluginRef: predicted-latency-scorer}\n        \
- {pluginRef: weighted-random-picker}\n    - name: default\n      plugins:\n        \
- {pluginRef: queue-scorer, weight: 2}\n        - {pluginRef: kv-cache-utilization-scorer, weight: 2}\n        \
- {pluginRef: prefix-cache-scorer, weight: 3}\n        - {pluginRef: max-score-picker}\n";

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
    http_call(addr, "GET", path)
}

fn http_call(addr: SocketAddr, method: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf)
}

/// Asks Envoy to exit through its admin API and waits for it, so that the access log holds
/// the last requests too (killed, Envoy loses the lines it has not flushed yet).
fn stop_envoy(admin: SocketAddr, envoy: &mut Proc) {
    if http_call(admin, "POST", "/quitquitquit").is_none() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !matches!(envoy.child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
    render_envoy_multi(root, listen, admin, &[extproc], tls, full_duplex, false)
}

/// Like [`render_envoy`] with several pickers in the `ext_proc` cluster (Envoy balances
/// requests over them with its LEAST_REQUEST policy).
pub fn render_envoy_multi(
    root: &Path,
    listen: u16,
    admin: u16,
    extproc: &[u16],
    tls: bool,
    full_duplex: bool,
    access_log: bool,
) -> Result<String> {
    let Some(&first) = extproc.first() else {
        bail!("Envoy needs at least one ext_proc port");
    };
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
    // The template has one ext_proc endpoint; repeat its `- endpoint:` block per extra port.
    let tmpl = match extproc.get(1..).filter(|rest| !rest.is_empty()) {
        None => tmpl,
        Some(rest) => {
            let lines: Vec<&str> = tmpl.lines().collect();
            let Some(at) = lines.iter().position(|l| l.contains("{{EXTPROC_PORT}}")) else {
                bail!("{} has no {{{{EXTPROC_PORT}}}} line", tmpl_path.display());
            };
            let start = lines[..at]
                .iter()
                .rposition(|l| l.trim_start().starts_with("- endpoint:"))
                .with_context(|| {
                    format!(
                        "{}: no `- endpoint:` before the ext_proc port",
                        tmpl_path.display()
                    )
                })?;
            let block = lines[start..=at].join("\n");
            let extra: Vec<String> = rest
                .iter()
                .map(|p| block.replace("{{EXTPROC_PORT}}", &p.to_string()))
                .collect();
            let mut out: Vec<String> = lines[..=at].iter().map(|l| (*l).to_owned()).collect();
            out.extend(extra);
            out.extend(lines[at + 1..].iter().map(|l| (*l).to_owned()));
            out.join("\n") + "\n"
        }
    };
    Ok(tmpl
        .replace("{{FAIL_OPEN_DESTINATION}}", "")
        .replace(
            "{{ACCESS_LOG}}",
            if access_log {
                sluice_testkit::envoy::ACCESS_LOG
            } else {
                ""
            },
        )
        .replace("{{ADMIN_PORT}}", &admin.to_string())
        .replace("{{LISTEN_PORT}}", &listen.to_string())
        .replace("{{EXTPROC_PORT}}", &first.to_string())
        .replace("{{FAILURE_MODE_ALLOW}}", "false")
        .replace("{{REQUEST_BODY_MODE}}", body)
        .replace("{{RESPONSE_BODY_MODE}}", body)
        .replace("{{TRAILER_MODE}}", trailers)
        .replace("{{EXTPROC_TLS}}", tls_block))
}

/// The pool the demo's controller publishes and its pickers subscribe to.
const POOL_NAMESPACE: &str = "default";
/// The demo pool's name.
const POOL_NAME: &str = "demo";
/// How many pickers subscribe to the controller.
const PICKERS: usize = 2;

/// The manifests file mode reads: the pool over every simulator port, one Pod per simulator
/// (podIP 127.0.0.1; endpoints are podIP:targetPort, so the active-ports annotation keeps
/// each Pod to its own simulator), and a sheddable objective.
pub fn demo_manifests(base: u16, servers: usize, presets: &[String], profile: Profile) -> String {
    let ports: Vec<String> = (0..servers as u16)
        .map(|i| format!("{{number: {}}}", base + i))
        .collect();
    let mut docs = vec![format!(
        "# sluice demo: edit me while the demo runs; the pickers follow within a second.\n\
         apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\n\
         metadata: {{name: {POOL_NAME}, namespace: {POOL_NAMESPACE}}}\nspec:\n  \
         selector: {{matchLabels: {{app: sim}}}}\n  targetPorts: [{}]\n  \
         endpointPickerRef: {{name: sluice-picker, port: {{number: 9002}}}}\n",
        ports.join(", ")
    )];
    for i in 0..servers as u16 {
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: sim-{i}\n  namespace: {POOL_NAMESPACE}\n  \
             labels: {{app: sim, inference.networking.k8s.io/engine-type: vllm, \
             sluice.dev/hardware-class: {}}}\n  \
             annotations: {{inference.networking.k8s.io/active-ports: \"{}\"}}\n\
             status:\n  podIP: 127.0.0.1\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
            presets
                .get(usize::from(i) % presets.len().max(1))
                .map_or("unknown", String::as_str),
            base + i
        ));
    }
    docs.push(format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata: {{name: batch, namespace: {POOL_NAMESPACE}}}\nspec: {{priority: -1, poolRef: {{name: {POOL_NAME}}}}}\n"
    ));
    if profile == Profile::Slo {
        docs.push(SLO_PICKER_CONFIG.to_owned());
    }
    docs.join("---\n")
}

/// Runs the demo.
pub fn run(root: &Path, args: &DemoArgs) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !args.no_build {
        eprintln!("demo: building release binaries (sluice-controller, sluice-picker, sluice-sim)");
        let status = Command::new(&cargo)
            .current_dir(root)
            .args([
                "build",
                "--release",
                "-p",
                "sluice-controller",
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
    let manifests = run_dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let base = free_port_run(args.servers)?;
    let (ctl_grpc, ctl_http, listen, admin) =
        (free_port()?, free_port()?, free_port()?, free_port()?);

    let mut sim = Proc::spawn(
        "sluice-sim fleet",
        Command::new(bin("sluice-sim")).args([
            "fleet",
            "-n",
            &args.servers.to_string(),
            "--base-port",
            &base.to_string(),
            "--presets",
            &args.presets.join(","),
        ]),
        run_dir.join("sim.log"),
    )?;
    let sim_addrs: Vec<SocketAddr> = (0..args.servers as u16)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], base + i)))
        .collect();
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

    std::fs::write(
        manifests.join("demo.yaml"),
        demo_manifests(base, args.servers, &args.presets, args.profile),
    )?;
    let mut controller = Proc::spawn(
        "sluice-controller",
        Command::new(bin("sluice-controller"))
            .arg("--manifests")
            .arg(&manifests)
            .args([
                "--grpc-addr",
                &format!("127.0.0.1:{ctl_grpc}"),
                "--metrics-addr",
                &format!("127.0.0.1:{ctl_http}"),
            ]),
        run_dir.join("controller.log"),
    )?;
    let ctl_http_addr = SocketAddr::from(([127, 0, 0, 1], ctl_http));
    wait_for(
        "sluice-controller /readyz",
        Duration::from_secs(20),
        &mut [&mut sim, &mut controller],
        || http_get(ctl_http_addr, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")),
    )?;

    let mut pickers = Vec::with_capacity(PICKERS);
    for i in 0..PICKERS {
        let (grpc, health, metrics) = (free_port()?, free_port()?, free_port()?);
        let p = Proc::spawn(
            "sluice-picker",
            Command::new(bin("sluice-picker")).args([
                "--controller-address",
                &format!("http://127.0.0.1:{ctl_grpc}"),
                "--pool-namespace",
                POOL_NAMESPACE,
                "--pool-name",
                POOL_NAME,
                "--picker-id",
                &format!("demo-picker-{i}"),
                "--bind-address",
                "127.0.0.1",
                "--grpc-port",
                &grpc.to_string(),
                "--grpc-health-port",
                &health.to_string(),
                "--metrics-port",
                &metrics.to_string(),
            ]),
            run_dir.join(format!("picker-{i}.log")),
        )?;
        pickers.push((p, grpc, SocketAddr::from(([127, 0, 0, 1], metrics))));
    }
    // Ready once the controller counts every picker in sync with the pool's config.
    let in_sync = format!(
        "sluice_controller_pickers_in_sync{{namespace=\"{POOL_NAMESPACE}\",pool=\"{POOL_NAME}\"}} {PICKERS}"
    );
    {
        let mut procs: Vec<&mut Proc> = vec![&mut sim, &mut controller];
        procs.extend(pickers.iter_mut().map(|(p, _, _)| p));
        wait_for(
            "both pickers to apply the controller's config",
            Duration::from_secs(30),
            &mut procs,
            || http_get(ctl_http_addr, "/metrics").is_some_and(|m| m.lines().any(|l| l == in_sync)),
        )?;
    }

    let envoy_cfg = run_dir.join("envoy.yaml");
    let extproc: Vec<u16> = pickers.iter().map(|(_, grpc, _)| *grpc).collect();
    std::fs::write(
        &envoy_cfg,
        render_envoy_multi(root, listen, admin, &extproc, true, true, true)?,
    )?;
    let mut envoy_proc = Proc::spawn(
        "envoy",
        Command::new(&envoy)
            .arg("-c")
            .arg(&envoy_cfg)
            .args([
                "--use-dynamic-base-id",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ])
            .args(
                args.envoy_log
                    .iter()
                    .flat_map(|c| ["--component-log-level", c.as_str()]),
            ),
        run_dir.join("envoy.log"),
    )?;
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    {
        let mut procs: Vec<&mut Proc> = vec![&mut sim, &mut controller, &mut envoy_proc];
        procs.extend(pickers.iter_mut().map(|(p, _, _)| p));
        wait_for("Envoy", Duration::from_secs(30), &mut procs, || {
            http_get(admin_addr, "/ready").is_some_and(|r| r.contains("LIVE"))
        })?;
    }

    eprintln!(
        "demo: {} simulated servers on 127.0.0.1:{base}.., sluice-controller (file mode) on :{ctl_grpc} \
         (metrics :{ctl_http}), {PICKERS} sluice-pickers (TLS) on :{}, Envoy on :{listen}",
        args.servers,
        extproc
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", :"),
    );
    eprintln!(
        "demo: manifests in {} (edit them: the pickers follow); logs and per-request records \
         (requests.jsonl) in {}",
        manifests.display(),
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
        .arg("--output")
        .arg(run_dir.join("requests.jsonl"))
        .status()
        .context("running sluice-sim load")?;
    for p in [&mut sim, &mut controller, &mut envoy_proc] {
        p.check()?;
    }
    for (p, _, _) in pickers.iter_mut() {
        p.check()?;
    }
    stop_envoy(admin_addr, &mut envoy_proc);
    if !status.success() {
        bail!("sluice-sim load failed ({status})");
    }
    for (i, (_, _, metrics_addr)) in pickers.iter().enumerate() {
        let Some(text) = http_get(*metrics_addr, "/metrics") else {
            continue;
        };
        println!("\nsluice-picker {i} decisions (inference_extension_scheduler_attempts_total):");
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
    if let Some(text) = http_get(ctl_http_addr, "/metrics") {
        println!("\nsluice-controller:");
        for line in text.lines().filter(|l| {
            [
                "sluice_controller_pool_config_version",
                "sluice_controller_pickers",
                "sluice_controller_picker_acks_total",
                "sluice_controller_config_propagation_seconds_sum",
                "sluice_controller_config_propagation_seconds_count",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        }) {
            println!("  {line}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_balances_over_every_picker() {
        let root = crate::project_root();
        let one = render_envoy(&root, 1, 2, 3001, true, true).unwrap();
        let two = render_envoy_multi(&root, 1, 2, &[3001, 3002], true, true, false).unwrap();
        assert_eq!(one.matches("port_value: 3001").count(), 1);
        assert_eq!(two.matches("port_value: 3001").count(), 1);
        assert_eq!(two.matches("port_value: 3002").count(), 1);
        assert_eq!(
            two.matches("- endpoint:").count(),
            one.matches("- endpoint:").count() + 1
        );
        assert!(!two.contains("{{"), "every placeholder is filled");
    }

    #[test]
    fn the_demo_envoy_logs_each_request_under_the_connection_manager() {
        let root = crate::project_root();
        let text = render_envoy_multi(&root, 1, 2, &[3001, 3002], true, true, true).unwrap();
        let cfg: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        let hcm = &cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        let format = hcm["access_log"][0]["typed_config"]["log_format"]["text_format_source"]
            ["inline_string"]
            .as_str()
            .unwrap_or_default();
        assert!(format.contains("id=%REQ(X-REQUEST-ID)%"), "{format}");
        assert!(format.ends_with('\n'), "one line per request: {format:?}");
        assert!(hcm["http_filters"].is_array(), "{hcm}");
        let quiet = render_envoy_multi(&root, 1, 2, &[3001], true, true, false).unwrap();
        assert!(!quiet.contains("access_log"));
    }

    #[test]
    fn demo_manifests_give_one_endpoint_per_simulator() {
        let presets = ["h100-llama8b".to_owned(), "l4-llama8b".to_owned()];
        let text = demo_manifests(7000, 3, &presets, Profile::Default);
        assert!(!text.contains("kind: EndpointPickerConfig"));
        assert_eq!(text.matches("hardware-class: h100-llama8b").count(), 2);
        let slo = demo_manifests(7000, 3, &presets, Profile::Slo);
        assert!(
            slo.contains("kind: EndpointPickerConfig") && slo.contains("predicted-latency-scorer")
        );
        assert_eq!(text.matches("kind: Pod").count(), 3);
        assert!(text.contains("targetPorts: [{number: 7000}, {number: 7001}, {number: 7002}]"));
        assert!(text.contains("active-ports: \"7002\""));
    }
}
