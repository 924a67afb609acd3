//! Lease-based leader election (kube-lease-manager). Only the leader writes status; every
//! replica serves config streams.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;

/// A running election.
#[derive(Debug)]
pub struct Election {
    /// True while this replica holds the Lease.
    pub leader: watch::Receiver<bool>,
    manager: tokio::task::AbortHandle,
    wrapper: tokio::task::AbortHandle,
}

impl Election {
    /// Stops renewing without releasing the Lease, as a crashed process would (tests use it
    /// to check that another replica takes over once the Lease lapses).
    pub fn abandon(self) {
        self.manager.abort();
        self.wrapper.abort();
    }
}

/// Joins the election; [`Election::leader`] is true while this replica holds the Lease. The
/// Lease is released when `stop` turns true.
pub async fn elect(
    client: Client,
    namespace: &str,
    lease_name: &str,
    identity: &str,
    duration_secs: u64,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Election> {
    // Renew a third of the duration before expiry (at least one second).
    let grace = (duration_secs / 3).max(1);
    let manager = LeaseManagerBuilder::new(client, lease_name)
        .with_namespace(namespace)
        .with_parameters(LeaseParams::new(identity, duration_secs, grace))
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("leader election with Lease {namespace}/{lease_name}: {e}"))?;
    let (rx, task) = manager.watch().await;
    let manager_abort = task.abort_handle();
    let (tx, out) = watch::channel(false);
    let mut inner = rx.clone();
    let wrapper = tokio::spawn(async move {
        loop {
            let is = *inner.borrow_and_update();
            tx.send_replace(is);
            tokio::select! {
                changed = inner.changed() => if changed.is_err() { break },
                _ = stop.changed() => break,
            }
        }
        tx.send_replace(false);
        // Dropping the receivers makes the manager release the Lease.
        drop(inner);
        drop(rx);
        if let Ok(Ok(manager)) = task.await {
            let _ = manager.release().await;
        }
    });
    Ok(Election {
        leader: out,
        manager: manager_abort,
        wrapper: wrapper.abort_handle(),
    })
}
