//! The picker's side of the controller's config stream (`sluice.config.v1`).
//!
//! Subscribes to one pool, applies every snapshot it receives through a caller-supplied
//! function, and answers each with an Ack (applied) or a NACK (refused, with the reason).
//! When the controller is away the picker keeps serving its last good config; the client
//! reconnects with exponential backoff and jitter and resumes by naming the version and
//! content hash it runs, so an unchanged config is not sent again. HTTP/2 keepalives notice
//! a dead controller.
//!
//! This module depends only on `sluice-core`, `sluice-proto`, tonic and tokio, so that it does
//! not couple to the picker's internals: wire it with
//!
//! ```ignore
//! let state = state.clone();
//! tokio::spawn(config_client::run(opts, move |s| state.apply_snapshot(s).map(|_| ()).map_err(|e| e.to_string()), shutdown));
//! ```

use std::time::Duration;

use sluice_core::{PoolRef, PoolSnapshot};
use sluice_proto::config::v1 as pb;
use sluice_proto::config::v1::config_distribution_client::ConfigDistributionClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{ClientTlsConfig, Endpoint};

/// Largest config message accepted (matches the controller's limit).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Reconnect backoff: exponential from `initial` to `max`, each wait drawn from
/// `[wait/2, wait]` so that many pickers do not reconnect in lockstep.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// First wait.
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// Settings of the config client.
#[derive(Clone, Debug)]
pub struct ConfigClientOptions {
    /// The controller's gRPC address, `http://host:port` or `https://host:port`.
    pub controller_address: String,
    /// The pool to subscribe to.
    pub pool: PoolRef,
    /// This picker's identity (its pod name), reported to the controller.
    pub picker_id: String,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// HTTP/2 keepalive ping interval (the timeout is half of it, at least one second).
    pub keepalive: Duration,
    /// TLS towards the controller (required for `https://` addresses).
    pub tls: Option<ClientTlsConfig>,
}

impl ConfigClientOptions {
    /// Options with default backoff and keepalive and no TLS.
    pub fn new(
        controller_address: impl Into<String>,
        pool: PoolRef,
        picker_id: impl Into<String>,
    ) -> Self {
        ConfigClientOptions {
            controller_address: controller_address.into(),
            pool,
            picker_id: picker_id.into(),
            backoff: Backoff::default(),
            keepalive: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// What the client observed, for health reporting and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStatus {
    /// Whether a stream to the controller is open.
    pub connected: bool,
    /// The version and content hash of the last applied snapshot (0, 0 before any).
    pub applied_version: u64,
    /// Content hash of the last applied snapshot.
    pub applied_hash: u64,
    /// Snapshots refused so far.
    pub refused: u64,
    /// Streams opened so far.
    pub connects: u64,
}

/// Runs the client until `shutdown` turns true. `apply` installs a snapshot and says why
/// not when it refuses one; the previous snapshot keeps serving in that case.
pub async fn run<F>(opts: ConfigClientOptions, apply: F, shutdown: watch::Receiver<bool>)
where
    F: Fn(PoolSnapshot) -> Result<(), String> + Send + Sync,
{
    run_with_status(
        opts,
        apply,
        shutdown,
        watch::Sender::new(ClientStatus::default()),
    )
    .await;
}

/// Like [`run`], publishing what it observes to `status`.
pub async fn run_with_status<F>(
    opts: ConfigClientOptions,
    apply: F,
    mut shutdown: watch::Receiver<bool>,
    status: watch::Sender<ClientStatus>,
) where
    F: Fn(PoolSnapshot) -> Result<(), String> + Send + Sync,
{
    let mut wait = opts.backoff.initial;
    let mut jitter = Jitter::new(&opts.picker_id);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let received = tokio::select! {
            r = session(&opts, &apply, &status) => r,
            _ = shutdown.changed() => return,
        };
        status.send_modify(|s| s.connected = false);
        match received {
            Ok(n) if n > 0 => wait = opts.backoff.initial,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(controller = %opts.controller_address, pool = %opts.pool, %error,
                "config stream failed; serving the last good config")
            }
        }
        let sleep = jitter.spread(wait);
        tracing::debug!(
            delay_ms = sleep.as_millis() as u64,
            "reconnecting to the controller"
        );
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.changed() => return,
        }
        wait = (wait * 2).min(opts.backoff.max);
    }
}

/// One stream: returns how many snapshots arrived before it ended.
async fn session<F>(
    opts: &ConfigClientOptions,
    apply: &F,
    status: &watch::Sender<ClientStatus>,
) -> Result<u64, String>
where
    F: Fn(PoolSnapshot) -> Result<(), String> + Send + Sync,
{
    let mut endpoint = Endpoint::from_shared(opts.controller_address.clone())
        .map_err(|e| {
            format!(
                "invalid controller address {:?}: {e}",
                opts.controller_address
            )
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(opts.keepalive)
        .keep_alive_timeout((opts.keepalive / 2).max(Duration::from_secs(1)))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(tls) = &opts.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS settings: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect {}: {e}", opts.controller_address))?;
    let mut client = ConfigDistributionClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let (tx, rx) = mpsc::channel::<pb::SubscribeRequest>(16);
    let (applied_version, applied_hash) = {
        let s = status.borrow();
        (s.applied_version, s.applied_hash)
    };
    let hello = pb::Hello {
        picker_id: opts.picker_id.clone(),
        pool_namespace: opts.pool.namespace.clone(),
        pool_name: opts.pool.name.clone(),
        last_applied_version: applied_version,
        last_applied_hash: applied_hash,
    };
    tx.send(pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Hello(hello)),
    })
    .await
    .map_err(|_| "request stream closed".to_owned())?;
    let mut inbound = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("subscribe: {}: {}", s.code(), s.message()))?
        .into_inner();
    status.send_modify(|s| {
        s.connected = true;
        s.connects += 1;
    });
    tracing::info!(controller = %opts.controller_address, pool = %opts.pool, "subscribed to the controller");

    let mut received = 0;
    loop {
        let msg = match inbound.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(s)) => return Err(format!("{}: {}", s.code(), s.message())),
            None => return Ok(received),
        };
        received += 1;
        let version = msg.version;
        let controller = msg.controller_id.clone();
        let outcome = PoolSnapshot::try_from(msg)
            .map_err(|e| e.to_string())
            .and_then(|snapshot| {
                if snapshot.pool != opts.pool {
                    return Err(format!(
                        "snapshot is for pool {}, this picker serves {}",
                        snapshot.pool, opts.pool
                    ));
                }
                let hash = snapshot.content_hash;
                apply(snapshot).map(|()| hash)
            });
        let ack = match outcome {
            Ok(hash) => {
                tracing::info!(pool = %opts.pool, version, %controller, "applied config");
                status.send_modify(|s| {
                    s.applied_version = version;
                    s.applied_hash = hash;
                });
                pb::Ack {
                    version,
                    accepted: true,
                    error: String::new(),
                }
            }
            Err(error) => {
                tracing::warn!(pool = %opts.pool, version, %error, "refused config; keeping the last good one");
                status.send_modify(|s| s.refused += 1);
                pb::Ack {
                    version,
                    accepted: false,
                    error,
                }
            }
        };
        if tx
            .send(pb::SubscribeRequest {
                kind: Some(pb::subscribe_request::Kind::Ack(ack)),
            })
            .await
            .is_err()
        {
            return Ok(received);
        }
    }
}

/// A small xorshift generator for backoff jitter (seeded per picker, so replicas spread).
#[derive(Debug)]
struct Jitter(u64);

impl Jitter {
    fn new(seed: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(nanos);
        for b in seed.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Jitter(h | 1)
    }

    /// A duration in `[d/2, d]`.
    fn spread(&mut self, d: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let frac = (self.0 % 1024) as f64 / 1023.0;
        d.mul_f64(0.5 + 0.5 * frac)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Jitter;

    #[test]
    fn jitter_stays_within_half_to_full_wait() {
        let mut j = Jitter::new("picker-0");
        let d = Duration::from_millis(800);
        let spreads: Vec<Duration> = (0..100).map(|_| j.spread(d)).collect();
        assert!(spreads.iter().all(|s| *s >= d / 2 && *s <= d));
        assert!(spreads.iter().any(|s| *s != spreads[0]), "waits must vary");
    }
}
