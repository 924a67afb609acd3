//! Per-endpoint running-request queues (upstream `PodAddRequest` / `PodRemoveRequest`,
//! reference §3.4): which requests this picker has dispatched to an endpoint and not yet seen
//! finish, with each request's TPOT SLO, so that a new request is not allowed to push an
//! endpoint past the tightest TPOT SLO of what already runs there.
//!
//! Entries leave on completion (every outcome: success, error, disconnect) and, as a safety
//! net against a lost completion, after a TTL. Bounded per endpoint and by the endpoints the
//! pool has (departed endpoints are dropped through `retain`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sluice_core::EndpointKey;

/// Largest number of tracked requests per endpoint; adds beyond it are refused (and the
/// request simply does not constrain later TPOT checks), so a leak cannot grow memory.
pub const MAX_PER_ENDPOINT: usize = 65_536;

#[derive(Clone, Debug)]
struct Entry {
    id: u64,
    tpot_slo_ms: f64,
    added: Instant,
    /// The client asked for a streamed response.
    streamed: bool,
    /// The first response chunk has arrived.
    started: bool,
}

/// What [`RunningRequests::snapshot`] reports for one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QueueView {
    /// Requests tracked.
    pub running: usize,
    /// The smallest positive TPOT SLO among them (0 if none).
    pub min_tpot_slo_ms: f64,
    /// How long the oldest request of the asked response mode has waited for its first
    /// chunk (zero if none is waiting).
    pub oldest_waiting: Duration,
}

/// Why [`RunningRequests::add`] refused an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddError {
    /// The id is already tracked (on any endpoint).
    Duplicate,
    /// The endpoint already tracks [`MAX_PER_ENDPOINT`] requests.
    Full,
}

/// The queues of every endpoint. Lists are short (the requests running on one server), so
/// a vector with a linear minimum beats a heap with an index map.
#[derive(Debug)]
pub struct RunningRequests {
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_endpoint: HashMap<EndpointKey, Vec<Entry>>,
    where_is: HashMap<u64, EndpointKey>,
    last_sweep: Option<Instant>,
}

impl RunningRequests {
    /// Queues whose entries expire `ttl` after they were added.
    pub fn new(ttl: Duration) -> Self {
        RunningRequests {
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Tracks request `id` on `endpoint` with its TPOT SLO (0 = none) and whether the
    /// client asked for a streamed response.
    pub fn add(
        &self,
        endpoint: &EndpointKey,
        id: u64,
        tpot_slo_ms: f64,
        streamed: bool,
        now: Instant,
    ) -> Result<(), AddError> {
        let mut g = self.inner.lock();
        self.sweep_locked(&mut g, now);
        if g.where_is.contains_key(&id) {
            return Err(AddError::Duplicate);
        }
        let list = g.by_endpoint.entry(endpoint.clone()).or_default();
        if list.len() >= MAX_PER_ENDPOINT {
            return Err(AddError::Full);
        }
        list.push(Entry {
            id,
            tpot_slo_ms: if tpot_slo_ms.is_finite() {
                tpot_slo_ms.max(0.0)
            } else {
                0.0
            },
            added: now,
            streamed,
            started: false,
        });
        g.where_is.insert(id, endpoint.clone());
        Ok(())
    }

    /// Records that request `id`'s first response chunk arrived.
    pub fn mark_started(&self, id: u64) {
        let mut g = self.inner.lock();
        let Inner {
            by_endpoint,
            where_is,
            ..
        } = &mut *g;
        if let Some(e) = where_is
            .get(&id)
            .and_then(|k| by_endpoint.get_mut(k))
            .and_then(|l| l.iter_mut().find(|e| e.id == id))
        {
            e.started = true;
        }
    }

    /// Stops tracking `id`; returns whether it was tracked. Idempotent.
    pub fn remove(&self, id: u64) -> bool {
        let mut g = self.inner.lock();
        let Some(key) = g.where_is.remove(&id) else {
            return false;
        };
        if let Some(list) = g.by_endpoint.get_mut(&key) {
            list.retain(|e| e.id != id);
            if list.is_empty() {
                g.by_endpoint.remove(&key);
            }
        }
        true
    }

    /// Moves tracked request `id` to `endpoint` (Envoy served it on a fallback), keeping
    /// its SLO and age; returns whether it was tracked. A full target queue leaves the
    /// entry where it was.
    pub fn move_to(&self, id: u64, endpoint: &EndpointKey) -> bool {
        let mut g = self.inner.lock();
        let Some(from) = g.where_is.get(&id).cloned() else {
            return false;
        };
        if &from == endpoint {
            return true;
        }
        if g.by_endpoint
            .get(endpoint)
            .is_some_and(|l| l.len() >= MAX_PER_ENDPOINT)
        {
            return false;
        }
        let Some(list) = g.by_endpoint.get_mut(&from) else {
            return false;
        };
        let Some(i) = list.iter().position(|e| e.id == id) else {
            return false;
        };
        let entry = list.swap_remove(i);
        if list.is_empty() {
            g.by_endpoint.remove(&from);
        }
        g.by_endpoint
            .entry(endpoint.clone())
            .or_default()
            .push(entry);
        g.where_is.insert(id, endpoint.clone());
        true
    }

    /// Requests tracked on `endpoint`.
    pub fn len(&self, endpoint: &EndpointKey) -> usize {
        self.inner
            .lock()
            .by_endpoint
            .get(endpoint)
            .map_or(0, Vec::len)
    }

    /// Requests tracked in total.
    pub fn total(&self) -> usize {
        self.inner.lock().where_is.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    /// The smallest positive TPOT SLO among requests running on `endpoint` (0 if none).
    pub fn min_tpot_slo(&self, endpoint: &EndpointKey) -> f64 {
        self.inner
            .lock()
            .by_endpoint
            .get(endpoint)
            .map_or(0.0, |l| min_positive(l.iter().map(|e| e.tpot_slo_ms)))
    }

    /// A [`QueueView`] per key, the waiting ages for `streamed` requests (or whole
    /// responses), under one lock.
    pub fn snapshot<'a>(
        &self,
        keys: impl Iterator<Item = &'a EndpointKey>,
        streamed: bool,
        now: Instant,
        out: &mut Vec<QueueView>,
    ) {
        let g = self.inner.lock();
        out.clear();
        out.extend(keys.map(|k| {
            g.by_endpoint
                .get(k)
                .map_or(QueueView::default(), |l| QueueView {
                    running: l.len(),
                    min_tpot_slo_ms: min_positive(l.iter().map(|e| e.tpot_slo_ms)),
                    oldest_waiting: l
                        .iter()
                        .filter(|e| e.streamed == streamed && !e.started)
                        .map(|e| now.saturating_duration_since(e.added))
                        .max()
                        .unwrap_or_default(),
                })
        }));
    }

    /// Drops entries older than the TTL. Also done on every add, at most once per second.
    pub fn expire(&self, now: Instant) -> usize {
        let mut g = self.inner.lock();
        g.last_sweep = None;
        self.sweep_locked(&mut g, now)
    }

    /// Forgets endpoints for which `keep` is false, with their requests.
    pub fn retain(&self, keep: &dyn Fn(&EndpointKey) -> bool) {
        let mut g = self.inner.lock();
        let Inner {
            by_endpoint,
            where_is,
            ..
        } = &mut *g;
        by_endpoint.retain(|k, list| {
            let kept = keep(k);
            if !kept {
                for e in list.iter() {
                    where_is.remove(&e.id);
                }
            }
            kept
        });
    }

    fn sweep_locked(&self, g: &mut Inner, now: Instant) -> usize {
        if g.last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return 0;
        }
        g.last_sweep = Some(now);
        let ttl = self.ttl;
        let Inner {
            by_endpoint,
            where_is,
            ..
        } = g;
        let mut removed = 0;
        by_endpoint.retain(|_, list| {
            list.retain(|e| {
                let keep = now.saturating_duration_since(e.added) < ttl;
                if !keep {
                    where_is.remove(&e.id);
                    removed += 1;
                }
                keep
            });
            !list.is_empty()
        });
        if removed > 0 {
            tracing::warn!(removed, ttl = ?ttl, "running-request entries expired without a completion");
        }
        removed
    }
}

fn min_positive(it: impl Iterator<Item = f64>) -> f64 {
    it.filter(|v| *v > 0.0)
        .fold(0.0, |m, v| if m == 0.0 || v < m { v } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> EndpointKey {
        EndpointKey {
            namespace: "ns".into(),
            pod: n.into(),
            rank: 0,
        }
    }

    #[test]
    fn add_remove_min_and_duplicates() {
        let q = RunningRequests::new(Duration::from_secs(300));
        let t = Instant::now();
        q.add(&key("a"), 1, 50.0, true, t).unwrap();
        q.add(&key("a"), 2, 0.0, true, t).unwrap();
        q.add(&key("a"), 3, 20.0, true, t).unwrap();
        assert_eq!(q.add(&key("b"), 3, 1.0, true, t), Err(AddError::Duplicate));
        assert_eq!(q.len(&key("a")), 3);
        assert_eq!(
            q.min_tpot_slo(&key("a")),
            20.0,
            "no-SLO entries do not lower the min"
        );
        assert!(q.remove(3));
        assert!(!q.remove(3), "idempotent");
        assert_eq!(q.min_tpot_slo(&key("a")), 50.0);
        q.remove(1);
        q.remove(2);
        assert!(q.is_empty());
        assert_eq!(q.min_tpot_slo(&key("a")), 0.0);
    }

    #[test]
    fn a_request_served_elsewhere_moves_with_its_slo() {
        let q = RunningRequests::new(Duration::from_secs(300));
        let t = Instant::now();
        q.add(&key("a"), 1, 30.0, true, t).unwrap();
        q.add(&key("a"), 2, 80.0, true, t).unwrap();
        assert!(q.move_to(1, &key("b")));
        assert_eq!((q.len(&key("a")), q.len(&key("b"))), (1, 1));
        assert_eq!(q.min_tpot_slo(&key("a")), 80.0);
        assert_eq!(
            q.min_tpot_slo(&key("b")),
            30.0,
            "the SLO travels with the request"
        );
        assert!(
            q.move_to(1, &key("b")),
            "moving to where it is changes nothing"
        );
        assert!(!q.move_to(9, &key("b")), "unknown ids are not invented");
        assert!(q.remove(1));
        assert_eq!(q.len(&key("b")), 0, "completion finds it where it moved");
        assert_eq!(q.total(), 1);
    }

    #[test]
    fn ttl_expires_lost_requests_and_retain_drops_departed_endpoints() {
        let q = RunningRequests::new(Duration::from_secs(10));
        let t = Instant::now();
        q.add(&key("a"), 1, 0.0, true, t).unwrap();
        q.add(&key("b"), 2, 0.0, true, t + Duration::from_secs(5))
            .unwrap();
        assert_eq!(q.expire(t + Duration::from_secs(11)), 1);
        assert_eq!(q.total(), 1);
        q.retain(&|k| k != &key("b"));
        assert!(q.is_empty());
        assert!(!q.remove(2));
    }

    #[test]
    fn the_oldest_request_without_a_first_chunk_is_reported_per_response_mode() {
        let q = RunningRequests::new(Duration::from_secs(300));
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        q.add(&key("a"), 1, 0.0, true, at(0)).unwrap();
        q.add(&key("a"), 2, 0.0, true, at(100)).unwrap();
        q.add(&key("a"), 3, 0.0, false, at(50)).unwrap();
        let view = |streamed: bool, now: u64| {
            let mut out = Vec::new();
            q.snapshot([key("a"), key("b")].iter(), streamed, at(now), &mut out);
            out
        };
        let v = view(true, 400);
        assert_eq!(v[0].running, 3);
        assert_eq!(v[0].oldest_waiting, Duration::from_millis(400));
        assert_eq!(v[1], QueueView::default(), "nothing on b");
        assert_eq!(
            view(false, 400)[0].oldest_waiting,
            Duration::from_millis(350)
        );
        q.mark_started(1);
        assert_eq!(
            view(true, 400)[0].oldest_waiting,
            Duration::from_millis(300)
        );
        q.mark_started(2);
        assert_eq!(view(true, 400)[0].oldest_waiting, Duration::ZERO);
        q.mark_started(99);
        assert_eq!(
            view(true, 400)[0].running,
            3,
            "an unknown id changes nothing"
        );
    }
}
