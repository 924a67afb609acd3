//! Shared fixtures for the end-to-end tests in `tests/*.rs`: a simulated fleet, an
//! in-process sluice-picker on free loopback ports, and a small HTTP client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluice_core::PoolRef;
use sluice_picker::metrics::Metrics;
use sluice_picker::scrape::ScrapeSettings;
use sluice_picker::server::{Bound, ServeConfig, serve};
use sluice_picker::tls::PemIdentity;
use sluice_picker::{PickerState, ServerOptions, standalone};
use sluice_sim::Preset;
use sluice_sim::server::{Handle, ServerConfig};

/// Simulated model servers.
#[derive(Debug)]
pub struct Fleet {
    /// The servers.
    pub servers: Vec<Handle>,
}

impl Fleet {
    /// `n` servers of `preset`, running `time_scale` times faster than real time.
    pub async fn start(n: usize, preset: Preset, time_scale: f64) -> Result<Fleet> {
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let mut cfg = ServerConfig::new(format!("sim-{i}"), preset.config());
            cfg.time_scale = time_scale;
            cfg.seed = i as u64;
            servers.push(sluice_sim::server::spawn(cfg).await?);
        }
        Ok(Fleet { servers })
    }

    /// The servers' addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.addr).collect()
    }

    /// The model the servers serve.
    pub fn model(preset: Preset) -> String {
        preset.config().model
    }
}

/// An in-process picker serving real gRPC.
#[derive(Debug)]
pub struct Picker {
    /// Its state (metrics, snapshot).
    pub state: PickerState,
    /// Bound ports.
    pub bound: Bound,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Picker {
    /// Starts a picker in standalone mode for `endpoints` with an EndpointPickerConfig text.
    pub async fn start(endpoints: &[SocketAddr], tls: bool, config_text: &str) -> Result<Picker> {
        let eps = endpoints
            .iter()
            .map(|a| sluice_core::Endpoint::from_address("default", *a))
            .collect();
        Picker::start_with(eps, tls, config_text).await
    }

    /// [`Picker::start`] for endpoints built by the caller (labels, for instance).
    pub async fn start_with(
        eps: Vec<sluice_core::Endpoint>,
        tls: bool,
        config_text: &str,
    ) -> Result<Picker> {
        let metrics = Arc::new(Metrics::new());
        let scrape = ScrapeSettings {
            interval: Duration::from_millis(50),
            ..Default::default()
        };
        let state = PickerState::new(metrics, Some(scrape), None);
        let config = standalone::config_from_text(config_text)?;
        let pool = PoolRef {
            namespace: "default".into(),
            name: "e2e".into(),
        };
        state.apply_snapshot(standalone::snapshot(pool, 1, eps, config))?;
        let tls = if tls {
            Some(PemIdentity::self_signed()?)
        } else {
            None
        };
        let (bound, stop_tx) = serve_on_loopback(state.clone(), tls).await?;
        Ok(Picker {
            state,
            bound,
            stop: Some(stop_tx),
        })
    }

    /// The picker's Prometheus text.
    pub async fn metrics_text(&self) -> Result<String> {
        Ok(
            request(self.bound.metrics, "GET", "/metrics", &[], Bytes::new())
                .await?
                .text(),
        )
    }
}

impl Drop for Picker {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Resp {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one HTTP/1.1 request.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Resp> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    let req = b.body(Full::new(body))?;
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .context("request timed out")?
        .with_context(|| format!("{method} {path} via {addr}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// The value of a Prometheus series (first sample whose line starts with `prefix`).
pub fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Serves a picker's state (ext_proc, health, metrics) on free loopback ports; sending on (or
/// dropping) the returned sender stops it.
pub async fn serve_on_loopback(
    state: PickerState,
    tls: Option<PemIdentity>,
) -> Result<(Bound, tokio::sync::oneshot::Sender<()>)> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let cfg = ServeConfig {
        grpc_addr: any,
        health_addr: any,
        metrics_addr: any,
        tls,
        health_on_grpc_port: false,
        metrics_staleness: Duration::from_secs(2),
        server: ServerOptions::default(),
    };
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let r = serve(
            cfg,
            state,
            async move {
                let _ = stop_rx.await;
            },
            move |b| {
                let _ = bound_tx.send(b);
            },
        )
        .await;
        if let Err(e) = r {
            eprintln!("picker stopped: {e:#}");
        }
    });
    let bound = bound_rx.await.context("picker failed to bind")?;
    Ok((bound, stop_tx))
}
