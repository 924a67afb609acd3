//! The publish side: one `tokio::sync::watch` per pool holding the latest compiled
//! snapshot, and the record of which picker runs which version.
//!
//! A watch channel keeps only the newest value, so a slow picker skips intermediate
//! snapshots and never builds a backlog: exactly what complete (non-delta) snapshots allow.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use sluice_core::{PoolRef, PoolSnapshot};
use tokio::sync::watch;

/// What one picker last told us about one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickerState {
    /// The version it last acknowledged (accepted or refused); 0 before any.
    pub version: u64,
    /// Whether it runs `version` (false: it refused it and keeps an older one).
    pub accepted: bool,
    /// The refusal reason for a NACK.
    pub error: Option<String>,
}

/// Counts of a pool's pickers, for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PickerCounts {
    /// Pickers subscribed to the pool now.
    pub total: usize,
    /// Of those, the ones running the pool's current version.
    pub in_sync: usize,
    /// Of those, the ones whose last answer was a NACK.
    pub refusing: usize,
}

#[derive(Debug)]
struct PoolEntry {
    tx: watch::Sender<Option<Arc<PoolSnapshot>>>,
    /// Last version handed out for this pool (survives deletion, so versions never repeat
    /// within a controller's lifetime).
    version: u64,
    /// When the current version was published, for the propagation histogram.
    published_at: Instant,
    /// Subscribed pickers by id.
    pickers: BTreeMap<String, PickerState>,
    /// When each picker subscribed: an Ack from a picker that joined after the publish
    /// measures its connect time, not propagation, and is left out of the histogram.
    subscribed_at: BTreeMap<String, Instant>,
}

/// Counters the hub keeps for the metrics endpoint. Cloning shares the values.
#[derive(Clone, Debug)]
pub struct HubStats {
    /// Acks of applied snapshots.
    pub acks: Counter,
    /// NACKs (a picker refused a snapshot).
    pub nacks: Counter,
    /// Seconds from a publish to each picker's Ack of that version, for pickers subscribed
    /// at publish time.
    pub propagation: Histogram,
}

/// Propagation buckets: a loopback Ack takes about a millisecond, the target is under a
/// second with 50 pickers.
const PROPAGATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Default for HubStats {
    fn default() -> Self {
        HubStats {
            acks: Counter::default(),
            nacks: Counter::default(),
            propagation: Histogram::new(PROPAGATION_BUCKETS),
        }
    }
}

/// Fan-out point between the compiler and the gRPC service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Mutex<BTreeMap<PoolRef, PoolEntry>>>,
    changes: Arc<watch::Sender<u64>>,
    stats: HubStats,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Hub {
            inner: Default::default(),
            changes: Arc::new(watch::Sender::new(0)),
            stats: HubStats::default(),
        }
    }

    /// The hub's counters (shared: register them once with a metrics registry).
    pub fn stats(&self) -> &HubStats {
        &self.stats
    }

    /// Publishes a pool's compiled content. The version is assigned here; content equal to
    /// what is published (same hash) is not republished. Returns the published version.
    pub fn publish(&self, mut snapshot: PoolSnapshot) -> u64 {
        let mut pools = self.inner.lock();
        let entry = pools
            .entry(snapshot.pool.clone())
            .or_insert_with(PoolEntry::new);
        if let Some(current) = entry.tx.borrow().as_ref()
            && current.content_hash == snapshot.content_hash
        {
            return current.version;
        }
        entry.version += 1;
        snapshot.version = entry.version;
        let version = entry.version;
        entry.published_at = Instant::now();
        entry.tx.send_replace(Some(Arc::new(snapshot)));
        drop(pools);
        self.bump();
        version
    }

    /// The published snapshot of a pool, if any.
    pub fn current(&self, pool: &PoolRef) -> Option<Arc<PoolSnapshot>> {
        self.inner
            .lock()
            .get(pool)
            .and_then(|e| e.tx.borrow().clone())
    }

    /// Every pool with a published snapshot.
    pub fn pools(&self) -> Vec<PoolRef> {
        self.inner
            .lock()
            .iter()
            .filter(|(_, e)| e.tx.borrow().is_some())
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Subscribes a picker to a pool (which need not exist yet). `last_version` is what the
    /// picker runs: versions handed out from now on exceed it, so that a picker coming from
    /// another (or an earlier) controller replica, whose counter was ahead, does not see the
    /// next snapshot as stale.
    pub fn subscribe(
        &self,
        pool: &PoolRef,
        picker_id: &str,
        last_version: u64,
        last_hash: u64,
    ) -> watch::Receiver<Option<Arc<PoolSnapshot>>> {
        let mut pools = self.inner.lock();
        let entry = pools.entry(pool.clone()).or_insert_with(PoolEntry::new);
        if last_version > 0 && entry.version <= last_version {
            entry.version = last_version;
            let current = entry.tx.borrow().clone();
            if let Some(current) = current.filter(|c| c.content_hash != last_hash) {
                entry.version += 1;
                let mut restamped = (*current).clone();
                restamped.version = entry.version;
                entry.tx.send_replace(Some(Arc::new(restamped)));
            }
        }
        entry.pickers.insert(
            picker_id.to_owned(),
            PickerState {
                version: 0,
                accepted: false,
                error: None,
            },
        );
        entry
            .subscribed_at
            .insert(picker_id.to_owned(), Instant::now());
        let rx = entry.tx.subscribe();
        drop(pools);
        self.bump();
        rx
    }

    /// Records that a picker already runs a version (it resumed with the current content).
    pub fn record_ack(
        &self,
        pool: &PoolRef,
        picker_id: &str,
        version: u64,
        accepted: bool,
        error: Option<String>,
    ) {
        if accepted {
            self.stats.acks.inc();
        } else {
            self.stats.nacks.inc();
        }
        self.set_state(pool, picker_id, version, accepted, error);
    }

    /// Records that a resuming picker already runs the current version (it sent no Ack: it
    /// named the content it runs in its Hello).
    pub fn record_resumed(&self, pool: &PoolRef, picker_id: &str, version: u64) {
        self.set_state(pool, picker_id, version, true, None);
    }

    fn set_state(
        &self,
        pool: &PoolRef,
        picker_id: &str,
        version: u64,
        accepted: bool,
        error: Option<String>,
    ) {
        let mut pools = self.inner.lock();
        if let Some(entry) = pools.get_mut(pool) {
            let current = entry.tx.borrow().as_ref().map(|s| s.version);
            let was_there = entry
                .subscribed_at
                .get(picker_id)
                .is_some_and(|t| *t <= entry.published_at);
            if let Some(state) = entry.pickers.get_mut(picker_id) {
                let first_ack_of_current = accepted
                    && Some(version) == current
                    && !(state.accepted && state.version == version);
                if first_ack_of_current && was_there {
                    self.stats
                        .propagation
                        .observe(entry.published_at.elapsed().as_secs_f64());
                }
                *state = PickerState {
                    version,
                    accepted,
                    error,
                };
            }
        }
        drop(pools);
        self.bump();
    }

    /// Removes a picker whose stream ended.
    pub fn unsubscribe(&self, pool: &PoolRef, picker_id: &str) {
        let mut pools = self.inner.lock();
        if let Some(entry) = pools.get_mut(pool) {
            entry.pickers.remove(picker_id);
            entry.subscribed_at.remove(picker_id);
        }
        drop(pools);
        self.bump();
    }

    /// The pickers of a pool and what they run.
    pub fn pickers(&self, pool: &PoolRef) -> BTreeMap<String, PickerState> {
        self.inner
            .lock()
            .get(pool)
            .map(|e| e.pickers.clone())
            .unwrap_or_default()
    }

    /// Every pool with a published snapshot: its current version and picker counts.
    pub fn summary(&self) -> Vec<(PoolRef, u64, PickerCounts)> {
        let pools = self.inner.lock();
        pools
            .iter()
            .filter_map(|(pool, entry)| {
                let version = entry.tx.borrow().as_ref()?.version;
                Some((pool.clone(), version, counts_of(entry)))
            })
            .collect()
    }

    /// How many of a pool's pickers run its current version.
    pub fn counts(&self, pool: &PoolRef) -> PickerCounts {
        let pools = self.inner.lock();
        pools.get(pool).map(counts_of).unwrap_or_default()
    }

    /// A receiver that changes whenever anything in the hub changes (for status writers and
    /// benchmarks waiting for acknowledgements).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Waits until `f` holds, re-checking on every change.
    pub async fn wait_until(&self, mut f: impl FnMut(&Hub) -> bool) {
        let mut rx = self.changes();
        loop {
            if f(self) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Signals a change that is not a publish (a config verdict changed), so that status
    /// writers look again.
    pub fn touch(&self) {
        self.bump();
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

fn counts_of(entry: &PoolEntry) -> PickerCounts {
    let current = entry.tx.borrow().as_ref().map(|s| s.version);
    PickerCounts {
        total: entry.pickers.len(),
        in_sync: entry
            .pickers
            .values()
            .filter(|p| p.accepted && Some(p.version) == current)
            .count(),
        refusing: entry
            .pickers
            .values()
            .filter(|p| !p.accepted && p.error.is_some())
            .count(),
    }
}

impl PoolEntry {
    fn new() -> Self {
        PoolEntry {
            tx: watch::Sender::new(None),
            version: 0,
            published_at: Instant::now(),
            pickers: BTreeMap::new(),
            subscribed_at: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::snapshot::AppProtocol;
    use sluice_core::{Endpoint, EndpointPickerConfig};

    fn pool() -> PoolRef {
        PoolRef {
            namespace: "ns".into(),
            name: "p".into(),
        }
    }

    fn snap(port: u16) -> PoolSnapshot {
        let ep = Endpoint::from_address("ns", ([10, 0, 0, 1], port).into());
        PoolSnapshot::new(
            pool(),
            0,
            AppProtocol::Http,
            vec![ep],
            vec![],
            vec![],
            EndpointPickerConfig::default(),
        )
    }

    #[test]
    fn versions_grow_only_when_content_changes() {
        let hub = Hub::new();
        assert_eq!(hub.publish(snap(1)), 1);
        assert_eq!(hub.publish(snap(1)), 1, "same content is not republished");
        assert_eq!(hub.publish(snap(2)), 2);
        assert_eq!(hub.current(&pool()).unwrap().version, 2);
    }

    #[test]
    fn a_slow_subscriber_sees_only_the_latest_snapshot() {
        let hub = Hub::new();
        let mut rx = hub.subscribe(&pool(), "picker-a", 0, 0);
        for port in 1..=50 {
            hub.publish(snap(port));
        }
        assert!(rx.has_changed().unwrap());
        let latest = rx.borrow_and_update().clone().unwrap();
        assert_eq!(latest.version, 50);
        assert!(!rx.has_changed().unwrap(), "no backlog of older versions");
    }

    #[test]
    fn versions_jump_past_what_a_resuming_picker_runs() {
        let hub = Hub::new();
        hub.publish(snap(1));
        let rx = hub.subscribe(&pool(), "from-another-replica", 40, 0);
        assert_eq!(
            rx.borrow().as_ref().unwrap().version,
            41,
            "current content is restamped"
        );
        assert_eq!(hub.publish(snap(2)), 42);
    }

    #[test]
    fn counts_track_acks_and_nacks() {
        let hub = Hub::new();
        let _a = hub.subscribe(&pool(), "a", 0, 0);
        let _b = hub.subscribe(&pool(), "b", 0, 0);
        let v = hub.publish(snap(1));
        hub.record_ack(&pool(), "a", v, true, None);
        hub.record_ack(&pool(), "b", v, false, Some("bad".into()));
        assert_eq!(
            hub.counts(&pool()),
            PickerCounts {
                total: 2,
                in_sync: 1,
                refusing: 1
            }
        );
        hub.publish(snap(2));
        assert_eq!(
            hub.counts(&pool()).in_sync,
            0,
            "a new version is not yet acknowledged"
        );
        hub.unsubscribe(&pool(), "b");
        assert_eq!(hub.counts(&pool()).total, 1);
    }
}
