//! Wiring: the shared index, the compile-and-publish loop, and the gRPC server.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

use crate::grpc::{ConfigService, Keepalive, server_builder};
use crate::hub::Hub;
use crate::index::{Compiled, Index, Validator};

/// The index behind a lock, with a wake-up for the compile loop. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SharedIndex {
    inner: Arc<Mutex<Index>>,
    notify: Arc<Notify>,
    /// Set once every source finished its initial listing: publishing earlier would hand
    /// pickers a partial pool (say, without its pods).
    synced: Arc<watch::Sender<bool>>,
}

impl SharedIndex {
    /// An empty index.
    pub fn new(validator: Validator) -> Self {
        SharedIndex {
            inner: Arc::new(Mutex::new(Index::new(validator))),
            notify: Arc::new(Notify::new()),
            synced: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Changes the index and wakes the compile loop.
    pub fn update<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        let out = f(&mut self.inner.lock());
        self.notify.notify_one();
        out
    }

    /// Reads the index.
    pub fn read<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        f(&self.inner.lock())
    }

    /// Declares the initial sync done; publishing starts.
    pub fn set_synced(&self) {
        self.synced.send_replace(true);
        self.notify.notify_one();
    }

    /// Whether every source finished its initial listing (readiness).
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Compiles dirty pools and publishes them, until `shutdown`.
    pub async fn run_compiler(self, hub: Hub, mut shutdown: watch::Receiver<bool>) {
        let mut synced = self.synced.subscribe();
        loop {
            if *synced.borrow_and_update() {
                self.compile_once(&hub);
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = synced.changed() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Compiles and publishes every dirty pool now.
    pub fn compile_once(&self, hub: &Hub) {
        let results = self.inner.lock().compile_dirty();
        if results.is_empty() {
            return;
        }
        for (pool, compiled) in results {
            match compiled {
                Compiled::Publish(snapshot) => {
                    let endpoints = snapshot.endpoints.len();
                    let version = hub.publish(snapshot);
                    tracing::debug!(pool = %pool, version, endpoints, "published");
                }
                Compiled::Deleted(snapshot) => {
                    if hub
                        .current(&pool)
                        .is_some_and(|s| !s.endpoints.is_empty() || !s.objectives.is_empty())
                    {
                        let version = hub.publish(snapshot);
                        tracing::info!(pool = %pool, version, "pool deleted: published an empty config");
                    }
                }
                Compiled::Withheld(reason) => {
                    tracing::warn!(pool = %pool, %reason, "pool not published");
                }
            }
        }
        hub.touch();
    }
}

/// Serves the config API on `addr` until `shutdown`; `tls` enables TLS.
pub async fn serve_grpc(
    addr: SocketAddr,
    hub: Hub,
    controller_id: String,
    keepalive: Keepalive,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_grpc_on(listener, hub, controller_id, keepalive, tls, shutdown).await
}

/// Like [`serve_grpc`] on a bound listener (tests bind port 0 first).
pub async fn serve_grpc_on(
    listener: tokio::net::TcpListener,
    hub: Hub,
    controller_id: String,
    keepalive: Keepalive,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let service = ConfigService::new(hub, controller_id, shutdown.clone()).into_server();
    let mut builder = server_builder(keepalive);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let mut stop = shutdown;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}
