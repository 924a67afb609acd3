//! The `sluice.config.v1.ConfigDistribution` server: every replica serves it, leader or not.
//!
//! One stream per (picker, pool). The picker's first message is a Hello; the controller
//! answers with the pool's current snapshot unless the picker already runs that content
//! (a reconnecting picker names its last applied hash), then with every newer snapshot.
//! Acks and NACKs are recorded in the [`Hub`].

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use sluice_core::PoolRef;
use sluice_proto::config::v1 as pb;
use sluice_proto::config::v1::config_distribution_server::{
    ConfigDistribution, ConfigDistributionServer,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::hub::Hub;

/// How long a picker has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest config message (a 10,000-pod pool with labels stays well below).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ConfigService {
    hub: Hub,
    controller_id: String,
    shutdown: watch::Receiver<bool>,
}

impl ConfigService {
    /// A service publishing what `hub` holds; streams end when `shutdown` turns true.
    pub fn new(
        hub: Hub,
        controller_id: impl Into<String>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        ConfigService {
            hub,
            controller_id: controller_id.into(),
            shutdown,
        }
    }

    /// The tonic server wrapping this service, with message size limits set.
    pub fn into_server(self) -> ConfigDistributionServer<Self> {
        ConfigDistributionServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

type ConfigStream = Pin<Box<dyn Stream<Item = Result<pb::PoolConfig, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ConfigDistribution for ConfigService {
    type SubscribeStream = ConfigStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let remote = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
            Ok(Some(Ok(pb::SubscribeRequest {
                kind: Some(pb::subscribe_request::Kind::Hello(h)),
            }))) => h,
            Ok(Some(Ok(_))) => {
                return Err(Status::invalid_argument(
                    "the first message on a Subscribe stream must be a Hello",
                ));
            }
            Ok(Some(Err(status))) => return Err(status),
            Ok(None) => return Err(Status::cancelled("stream closed before Hello")),
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no Hello within {}s",
                    HELLO_TIMEOUT.as_secs()
                )));
            }
        };
        if hello.pool_namespace.is_empty() || hello.pool_name.is_empty() {
            return Err(Status::invalid_argument(format!(
                "Hello must name the pool: got pool_namespace={:?} pool_name={:?}",
                hello.pool_namespace, hello.pool_name
            )));
        }
        let pool = PoolRef {
            namespace: hello.pool_namespace.clone(),
            name: hello.pool_name.clone(),
        };
        let picker_id = if hello.picker_id.is_empty() {
            remote
        } else {
            hello.picker_id.clone()
        };
        tracing::info!(pool = %pool, picker = %picker_id, last_version = hello.last_applied_version,
            last_hash = hello.last_applied_hash, "picker subscribed");

        let hub = self.hub.clone();
        let mut snapshots = hub.subscribe(
            &pool,
            &picker_id,
            hello.last_applied_version,
            hello.last_applied_hash,
        );
        let (tx, rx) = mpsc::channel::<Result<pb::PoolConfig, Status>>(1);
        let mut shutdown = self.shutdown.clone();
        let controller_id = self.controller_id.clone();

        // Inbound: Acks until the picker goes away (a dead peer is detected by HTTP/2
        // keepalive, which errors this stream).
        let (gone_tx, mut gone) = watch::channel(false);
        {
            let hub = hub.clone();
            let pool = pool.clone();
            let picker_id = picker_id.clone();
            tokio::spawn(async move {
                while let Some(msg) = inbound.next().await {
                    match msg {
                        Ok(pb::SubscribeRequest {
                            kind: Some(pb::subscribe_request::Kind::Ack(ack)),
                        }) => {
                            if ack.accepted {
                                tracing::debug!(pool = %pool, picker = %picker_id, version = ack.version, "picker applied config");
                            } else {
                                tracing::warn!(pool = %pool, picker = %picker_id, version = ack.version,
                                    error = %ack.error, "picker refused config");
                            }
                            let error = (!ack.accepted).then_some(ack.error);
                            hub.record_ack(&pool, &picker_id, ack.version, ack.accepted, error);
                        }
                        Ok(_) => {
                            tracing::debug!(pool = %pool, picker = %picker_id, "ignoring repeated Hello")
                        }
                        Err(status) => {
                            tracing::info!(pool = %pool, picker = %picker_id, %status, "picker stream failed");
                            break;
                        }
                    }
                }
                let _ = gone_tx.send(true);
            });
        }

        // Outbound: the latest snapshot whenever it differs from what the picker runs.
        tokio::spawn(async move {
            let mut last_sent_hash = hello.last_applied_hash;
            let mut first = true;
            loop {
                let snapshot = snapshots.borrow_and_update().clone();
                if let Some(snapshot) = snapshot {
                    if snapshot.content_hash != last_sent_hash {
                        let mut msg = pb::PoolConfig::from(&*snapshot);
                        msg.controller_id.clone_from(&controller_id);
                        if tx.send(Ok(msg)).await.is_err() {
                            break;
                        }
                        last_sent_hash = snapshot.content_hash;
                    } else if first {
                        // A resuming picker already runs this content: it is in sync.
                        hub.record_resumed(&pool, &picker_id, snapshot.version);
                    }
                }
                first = false;
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { break },
                    _ = gone.changed() => break,
                    _ = shutdown.changed() => break,
                    _ = tx.closed() => break,
                }
            }
            hub.unsubscribe(&pool, &picker_id);
            tracing::info!(pool = %pool, picker = %picker_id, "picker unsubscribed");
        });

        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Transport settings shared by the server and tests: HTTP/2 keepalive so that a dead
/// picker (or controller) is noticed within about `interval + timeout`.
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    /// How often to ping an idle connection.
    pub interval: Duration,
    /// How long to wait for the ping's answer.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
        }
    }
}

/// A tonic server builder with keepalives set.
pub fn server_builder(keepalive: Keepalive) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(keepalive.interval))
        .http2_keepalive_timeout(Some(keepalive.timeout))
        .tcp_keepalive(Some(keepalive.interval))
        .tcp_nodelay(true)
}
