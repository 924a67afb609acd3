//! The queues: bands by priority, flows inside a band, ordered items inside a flow.
//!
//! Everything here runs under the controller's one lock, so it is plain data with no
//! synchronisation. Every item lives once in `items` (keyed by a monotonically increasing id,
//! so iteration order is arrival order); bands, flows and the expiry index hold only ids.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{BandConfig, FairnessPolicy, FlowControlConfig, OrderingPolicy};
use crate::outcome::Outcome;
use crate::workload::{WorkloadEntry, score};

pub(crate) type ItemId = u64;

/// One queued request.
#[derive(Debug)]
pub(crate) struct Item<T> {
    pub band: i32,
    pub flow: Arc<str>,
    pub flow_label: Arc<str>,
    pub sort_key: u64,
    pub enqueued: Instant,
    pub expires: Option<Instant>,
    pub bytes: u64,
    pub criticality: u8,
    pub workload: Arc<WorkloadEntry>,
    /// Whatever the controller needs to finish the request (its reply channel).
    pub payload: T,
}

/// Where a new item goes and what it carries.
#[derive(Debug)]
pub(crate) struct NewItem<T> {
    pub band: i32,
    pub flow: Arc<str>,
    pub flow_label: Arc<str>,
    pub enqueued: Instant,
    pub ttl: Duration,
    pub slo_deadline: Option<Instant>,
    pub bytes: u64,
    pub criticality: u8,
    pub workload: Arc<WorkloadEntry>,
    pub payload: T,
}

#[derive(Debug)]
enum FlowQueue {
    /// Ordered by `(sort_key, id)`: FCFS (key 0), EDF and SLO deadline (key = deadline).
    Keyed(BTreeSet<(u64, ItemId)>),
    /// Workload-aware: one FIFO per (workload, criticality). Inside such a group every item
    /// has the same criticality and rate and the oldest has waited longest, so the oldest
    /// always has the best score; only group heads need scoring at dispatch time, which keeps
    /// the time-dependent score fresh without re-sorting.
    Groups(HashMap<(Arc<str>, u8), BTreeSet<ItemId>>),
}

impl FlowQueue {
    fn new(ordering: &OrderingPolicy) -> Self {
        match ordering {
            OrderingPolicy::WorkloadAware(_) => FlowQueue::Groups(HashMap::new()),
            _ => FlowQueue::Keyed(BTreeSet::new()),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            FlowQueue::Keyed(s) => s.is_empty(),
            FlowQueue::Groups(g) => g.is_empty(),
        }
    }
}

/// How good a flow's head is; compared only between flows of the same band.
#[derive(Debug, Clone, Copy)]
enum Rank {
    /// Lower key first, then lower id.
    Key(u64, ItemId),
    /// Higher score first, then lower id.
    Score(f64, ItemId),
}

impl Rank {
    fn id(self) -> ItemId {
        match self {
            Rank::Key(_, id) | Rank::Score(_, id) => id,
        }
    }

    fn better_than(self, other: Rank) -> bool {
        match (self, other) {
            (Rank::Key(a, ia), Rank::Key(b, ib)) => (a, ia) < (b, ib),
            (Rank::Score(a, ia), Rank::Score(b, ib)) => match a.total_cmp(&b) {
                Ordering::Greater => true,
                Ordering::Less => false,
                Ordering::Equal => ia < ib,
            },
            // Cannot happen inside one band; fall back to arrival order.
            (a, b) => a.id() < b.id(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Band {
    pub priority: i32,
    pub config: BandConfig,
    flows: BTreeMap<Arc<str>, FlowQueue>,
    rr_last: Option<Arc<str>>,
    pub len: u64,
    pub bytes: u64,
}

/// All queued items.
#[derive(Debug)]
pub(crate) struct Queues<T> {
    epoch: Instant,
    next_id: ItemId,
    items: BTreeMap<ItemId, Item<T>>,
    bands: BTreeMap<Reverse<i32>, Band>,
    expiry: BTreeSet<(Instant, ItemId)>,
    pub len: u64,
    pub bytes: u64,
    priorities: Vec<i32>,
}

impl<T> Queues<T> {
    pub fn new(config: &FlowControlConfig, now: Instant) -> Self {
        let mut q = Self {
            epoch: now,
            next_id: 0,
            items: BTreeMap::new(),
            bands: BTreeMap::new(),
            expiry: BTreeSet::new(),
            len: 0,
            bytes: 0,
            priorities: Vec::new(),
        };
        for &p in config.bands.keys() {
            q.band_mut(config, p);
        }
        q
    }

    /// Every band's priority (for usage-limit ceilings).
    pub fn priorities(&self) -> &[i32] {
        &self.priorities
    }

    /// Bands from the highest priority down.
    pub fn bands(&self) -> impl Iterator<Item = &Band> {
        self.bands.values()
    }

    fn band_mut(&mut self, config: &FlowControlConfig, priority: i32) -> &mut Band {
        let priorities = &mut self.priorities;
        self.bands.entry(Reverse(priority)).or_insert_with(|| {
            priorities.push(priority);
            Band {
                priority,
                config: config.band(priority).clone(),
                flows: BTreeMap::new(),
                rr_last: None,
                len: 0,
                bytes: 0,
            }
        })
    }

    /// Checks the global and band limits, then queues the item.
    pub fn insert(
        &mut self,
        config: &FlowControlConfig,
        new: NewItem<T>,
    ) -> Result<ItemId, (Outcome, T)> {
        let over = |limit: u64, used: u64, add: u64| limit != 0 && used.saturating_add(add) > limit;
        if over(config.max_requests, self.len, 1) || over(config.max_bytes, self.bytes, new.bytes) {
            return Err((Outcome::RejectedCapacity, new.payload));
        }
        let epoch = self.epoch;
        let id = self.next_id;
        let band = self.band_mut(config, new.band);
        if over(band.config.max_requests, band.len, 1)
            || over(band.config.max_bytes, band.bytes, new.bytes)
        {
            return Err((Outcome::RejectedCapacity, new.payload));
        }
        let expires = (!new.ttl.is_zero()).then(|| new.enqueued + new.ttl);
        let nanos = |t: Option<Instant>| {
            t.map_or(u64::MAX, |t| {
                u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
            })
        };
        let sort_key = match band.config.ordering {
            OrderingPolicy::Fcfs | OrderingPolicy::WorkloadAware(_) => 0,
            OrderingPolicy::Edf => nanos(expires),
            OrderingPolicy::SloDeadline => nanos(new.slo_deadline),
        };
        let flow = band
            .flows
            .entry(new.flow.clone())
            .or_insert_with(|| FlowQueue::new(&band.config.ordering));
        match flow {
            FlowQueue::Keyed(set) => {
                set.insert((sort_key, id));
            }
            FlowQueue::Groups(groups) => {
                groups
                    .entry((new.workload.id().clone(), new.criticality))
                    .or_default()
                    .insert(id);
            }
        }
        band.len += 1;
        band.bytes += new.bytes;
        self.next_id += 1;
        self.len += 1;
        self.bytes += new.bytes;
        if let Some(t) = expires {
            self.expiry.insert((t, id));
        }
        self.items.insert(
            id,
            Item {
                band: new.band,
                flow: new.flow,
                flow_label: new.flow_label,
                sort_key,
                enqueued: new.enqueued,
                expires,
                bytes: new.bytes,
                criticality: new.criticality,
                workload: new.workload,
                payload: new.payload,
            },
        );
        Ok(id)
    }

    /// Takes an item out of every index.
    pub fn remove(&mut self, id: ItemId) -> Option<Item<T>> {
        let item = self.items.remove(&id)?;
        if let Some(t) = item.expires {
            self.expiry.remove(&(t, id));
        }
        self.len -= 1;
        self.bytes -= item.bytes;
        if let Some(band) = self.bands.get_mut(&Reverse(item.band)) {
            band.len -= 1;
            band.bytes -= item.bytes;
            if let Some(flow) = band.flows.get_mut(&item.flow) {
                match flow {
                    FlowQueue::Keyed(set) => {
                        set.remove(&(item.sort_key, id));
                    }
                    FlowQueue::Groups(groups) => {
                        let key = (item.workload.id().clone(), item.criticality);
                        if let Some(g) = groups.get_mut(&key) {
                            g.remove(&id);
                            if g.is_empty() {
                                groups.remove(&key);
                            }
                        }
                    }
                }
                // Empty flows are dropped at once: flow ids come from client headers, so
                // keeping them would let memory grow without bound.
                if flow.is_empty() {
                    band.flows.remove(&item.flow);
                }
            }
        }
        Some(item)
    }

    /// The item the band would dispatch next, by its fairness and ordering policies.
    pub fn pick(&mut self, priority: i32, now: Instant, rate_window: Duration) -> Option<ItemId> {
        let band = self.bands.get_mut(&Reverse(priority))?;
        let items = &self.items;
        let head = |flow: &FlowQueue| -> Option<Rank> {
            match flow {
                FlowQueue::Keyed(set) => set.first().map(|&(k, id)| Rank::Key(k, id)),
                FlowQueue::Groups(groups) => {
                    let OrderingPolicy::WorkloadAware(params) = &band.config.ordering else {
                        return None;
                    };
                    let mut best: Option<Rank> = None;
                    for ids in groups.values() {
                        let Some(item) = ids.first().and_then(|id| items.get(id)) else {
                            continue;
                        };
                        let wait = now.saturating_duration_since(item.enqueued);
                        let rate = item.workload.rate(now, rate_window);
                        let rank =
                            Rank::Score(score(params, wait, item.criticality, rate), *ids.first()?);
                        if best.is_none_or(|b| rank.better_than(b)) {
                            best = Some(rank);
                        }
                    }
                    best
                }
            }
        };
        match band.config.fairness {
            FairnessPolicy::GlobalStrict => {
                let mut best: Option<Rank> = None;
                for flow in band.flows.values() {
                    if let Some(rank) = head(flow)
                        && best.is_none_or(|b| rank.better_than(b))
                    {
                        best = Some(rank);
                    }
                }
                best.map(Rank::id)
            }
            FairnessPolicy::RoundRobin => {
                let after = match &band.rr_last {
                    Some(last) => band
                        .flows
                        .range::<Arc<str>, _>((Bound::Excluded(last), Bound::Unbounded))
                        .next(),
                    None => None,
                };
                let (key, flow) = after.or_else(|| band.flows.iter().next())?;
                let id = head(flow)?.id();
                let key = key.clone();
                band.rr_last = Some(key);
                Some(id)
            }
        }
    }

    /// The earliest TTL deadline.
    pub fn next_expiry(&self) -> Option<(Instant, ItemId)> {
        self.expiry.first().copied()
    }

    /// The oldest item.
    pub fn oldest(&self) -> Option<(ItemId, Instant)> {
        self.items
            .first_key_value()
            .map(|(&id, item)| (id, item.enqueued))
    }

    /// All ids, oldest first.
    pub fn ids(&self) -> Vec<ItemId> {
        self.items.keys().copied().collect()
    }

    /// Queued requests and bytes per (flow label, priority).
    pub fn sizes(&self) -> HashMap<(Arc<str>, i32), (u64, u64)> {
        let mut out: HashMap<(Arc<str>, i32), (u64, u64)> = HashMap::new();
        for item in self.items.values() {
            let e = out.entry((item.flow_label.clone(), item.band)).or_default();
            e.0 += 1;
            e.1 += item.bytes;
        }
        out
    }
}
