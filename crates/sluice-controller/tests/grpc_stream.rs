//! The config stream end to end over real gRPC: controller hub + service on one side, the
//! picker's `config_client` (compiled in from the picker crate) on the other.

// Test helpers outside #[test] functions may fail loudly too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../sluice-picker/src/config_client.rs"]
#[allow(dead_code)]
mod config_client;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use config_client::{Backoff, ClientStatus, ConfigClientOptions};
use sluice_controller::grpc::Keepalive;
use sluice_controller::hub::Hub;
use sluice_core::snapshot::AppProtocol;
use sluice_core::{Endpoint, EndpointPickerConfig, PoolRef, PoolSnapshot};
use tokio::sync::watch;

fn pool() -> PoolRef {
    PoolRef {
        namespace: "ns".into(),
        name: "pool".into(),
    }
}

fn snap(ports: &[u16]) -> PoolSnapshot {
    let eps = ports
        .iter()
        .map(|p| Endpoint::from_address("ns", ([10, 0, 0, 1], *p).into()))
        .collect();
    PoolSnapshot::new(
        pool(),
        0,
        AppProtocol::Http,
        eps,
        vec![],
        vec![],
        EndpointPickerConfig::default(),
    )
}

struct Controller {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_controller(hub: Hub, addr: Option<SocketAddr>) -> Controller {
    let listener = tokio::net::TcpListener::bind(addr.unwrap_or(([127, 0, 0, 1], 0).into()))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    let keepalive = Keepalive {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
    };
    let task = tokio::spawn(async move {
        sluice_controller::runtime::serve_grpc_on(
            listener,
            hub,
            "test".into(),
            keepalive,
            None,
            rx,
        )
        .await
        .unwrap();
    });
    Controller { addr, stop, task }
}

impl Controller {
    async fn kill(self) {
        let _ = self.stop.send(true);
        self.task.abort();
        let _ = self.task.await;
    }
}

struct Picker {
    applied: Arc<Mutex<Vec<PoolSnapshot>>>,
    status: watch::Receiver<ClientStatus>,
    _stop: watch::Sender<bool>,
}

fn start_picker(addr: SocketAddr, id: &str, refuse_ports_over: Option<u16>) -> Picker {
    let applied = Arc::new(Mutex::new(Vec::new()));
    let sink = applied.clone();
    let apply = move |s: PoolSnapshot| {
        if let Some(limit) = refuse_ports_over
            && s.endpoints.iter().any(|e| e.address.port() > limit)
        {
            return Err(format!("port above {limit}"));
        }
        sink.lock().unwrap().push(s);
        Ok(())
    };
    let mut opts = ConfigClientOptions::new(format!("http://{addr}"), pool(), id);
    opts.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    opts.keepalive = Duration::from_secs(1);
    let (stop, stop_rx) = watch::channel(false);
    let (status_tx, status) = watch::channel(ClientStatus::default());
    tokio::spawn(config_client::run_with_status(
        opts, apply, stop_rx, status_tx,
    ));
    Picker {
        applied,
        status,
        _stop: stop,
    }
}

impl Picker {
    async fn wait_applied(&mut self, f: impl Fn(&ClientStatus) -> bool) -> ClientStatus {
        tokio::time::timeout(Duration::from_secs(5), self.status.wait_for(|s| f(s)))
            .await
            .expect("timed out")
            .unwrap()
            .clone()
    }

    fn last_ports(&self) -> Vec<u16> {
        let applied = self.applied.lock().unwrap();
        applied
            .last()
            .map(|s| s.endpoints.iter().map(|e| e.address.port()).collect())
            .unwrap_or_default()
    }
}

async fn within(hub: &Hub, f: impl FnMut(&Hub) -> bool) {
    tokio::time::timeout(Duration::from_secs(5), hub.wait_until(f))
        .await
        .expect("timed out");
}

#[tokio::test]
async fn a_subscriber_gets_the_snapshot_at_once_then_every_change_and_acks_are_recorded() {
    let hub = Hub::new();
    hub.publish(snap(&[8000]));
    let ctl = start_controller(hub.clone(), None).await;
    let mut a = start_picker(ctl.addr, "a", None);
    let mut b = start_picker(ctl.addr, "b", None);
    a.wait_applied(|s| s.applied_version == 1).await;
    b.wait_applied(|s| s.applied_version == 1).await;
    within(&hub, |h| h.counts(&pool()).in_sync == 2).await;

    hub.publish(snap(&[8000, 8001]));
    a.wait_applied(|s| s.applied_version == 2).await;
    assert_eq!(a.last_ports(), [8000, 8001]);
    within(&hub, |h| h.counts(&pool()).in_sync == 2).await;
    ctl.kill().await;
}

#[tokio::test]
async fn a_refused_snapshot_is_nacked_and_the_picker_keeps_its_last_good_config() {
    let hub = Hub::new();
    hub.publish(snap(&[8000]));
    let ctl = start_controller(hub.clone(), None).await;
    let mut p = start_picker(ctl.addr, "p", Some(8500));
    p.wait_applied(|s| s.applied_version == 1).await;
    hub.publish(snap(&[9000]));
    p.wait_applied(|s| s.refused == 1).await;
    assert_eq!(p.last_ports(), [8000]);
    within(&hub, |h| {
        h.pickers(&pool())
            .get("p")
            .is_some_and(|s| !s.accepted && s.version == 2)
    })
    .await;
    let state = hub.pickers(&pool())["p"].clone();
    assert_eq!(state.error.as_deref(), Some("port above 8500"));
    assert_eq!(hub.counts(&pool()).refusing, 1);
    ctl.kill().await;
}

#[tokio::test]
async fn pickers_keep_serving_without_the_controller_and_resync_when_it_returns() {
    let hub = Hub::new();
    hub.publish(snap(&[8000]));
    let ctl = start_controller(hub.clone(), None).await;
    let addr = ctl.addr;
    let mut p = start_picker(addr, "p", None);
    p.wait_applied(|s| s.applied_version == 1 && s.connected)
        .await;
    ctl.kill().await;
    p.wait_applied(|s| !s.connected).await;
    assert_eq!(p.last_ports(), [8000], "the last good config stays");

    // A restarted controller starts its version count afresh and has new content.
    let hub2 = Hub::new();
    hub2.publish(snap(&[8002]));
    let ctl2 = start_controller(hub2.clone(), Some(addr)).await;
    let st = p
        .wait_applied(|s| s.connected && s.applied_hash == snap(&[8002]).content_hash)
        .await;
    assert!(
        st.applied_version > 1,
        "versions continue above what the picker ran: {st:?}"
    );
    assert_eq!(p.last_ports(), [8002]);
    ctl2.kill().await;
}

#[tokio::test]
async fn a_resuming_picker_that_runs_the_current_content_is_not_sent_it_again() {
    let hub = Hub::new();
    hub.publish(snap(&[8000]));
    let ctl = start_controller(hub.clone(), None).await;
    let addr = ctl.addr;
    let mut p = start_picker(addr, "p", None);
    p.wait_applied(|s| s.applied_version == 1).await;
    ctl.kill().await;
    p.wait_applied(|s| !s.connected).await;
    let ctl = start_controller(hub.clone(), Some(addr)).await;
    p.wait_applied(|s| s.connected && s.connects == 2).await;
    within(&hub, |h| h.counts(&pool()).in_sync == 1).await;
    assert_eq!(
        p.applied.lock().unwrap().len(),
        1,
        "unchanged content is not re-sent"
    );
    ctl.kill().await;
}

#[tokio::test]
async fn a_picker_subscribing_before_the_pool_exists_gets_it_when_it_appears() {
    let hub = Hub::new();
    let ctl = start_controller(hub.clone(), None).await;
    let mut p = start_picker(ctl.addr, "p", None);
    within(&hub, |h| h.counts(&pool()).total == 1).await;
    hub.publish(snap(&[8000]));
    p.wait_applied(|s| s.applied_version == 1).await;
    ctl.kill().await;
}
