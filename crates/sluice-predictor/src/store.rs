//! Bounded, stratified training-sample storage (upstream's bucketed deques).
//!
//! Samples are bucketed by (class, role, queue depth, KV usage, prefix score) like upstream
//! (§10.3 of the SLO reference: queue 0 / 1–2 / 3–5 / 6–10 / ≥11, KV in 5 % steps, prefix in
//! quarters), with a per-bucket cap that drops the oldest sample. Stratification keeps rare
//! regimes (a deep queue, a full KV cache) in the training set even when most traffic is
//! idle, and keeps the set recent. Upstream's cap is per bucket only; with hardware classes
//! the bucket count multiplies, so there is also a global cap: past it the oldest sample of
//! the fullest bucket goes (the fullest is re-found every 64 evictions, not per sample).

use std::collections::{BTreeMap, VecDeque};

use crate::features::Features;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Row {
    pub features: Features,
    pub y: f64,
}

#[derive(Debug)]
pub(crate) struct Store {
    per_bucket: usize,
    max_total: usize,
    total: usize,
    /// Ordered by key so that `rows` (and so every fit) sees the samples in the same order
    /// on every run: a fit is then reproducible, and so is the closed-loop benchmark.
    buckets: BTreeMap<u64, VecDeque<Row>>,
    /// The bucket evictions take from, re-chosen every `RESCAN_EVERY` evictions so a full
    /// store does not scan every bucket per sample.
    victim: Option<u64>,
    evictions: usize,
}

const RESCAN_EVERY: usize = 64;

fn queue_bucket(waiting: u32) -> u64 {
    match waiting {
        0 => 0,
        1..=2 => 1,
        3..=5 => 2,
        6..=10 => 3,
        _ => 4,
    }
}

fn bucket_key(f: &Features) -> u64 {
    let kv = (f.kv_cache_usage * 20.0).clamp(0.0, 19.0) as u64;
    let prefix = (f.prefix_cache_score * 4.0).clamp(0.0, 3.0) as u64;
    let group = crate::model::group_index(f.class, f.role, f.streamed) as u64;
    (((group * 5 + queue_bucket(f.waiting)) * 20 + kv) * 4) + prefix
}

impl Store {
    pub(crate) fn new(per_bucket: usize, max_total: usize) -> Self {
        Store {
            per_bucket: per_bucket.max(1),
            max_total: max_total.max(1),
            total: 0,
            buckets: BTreeMap::new(),
            victim: None,
            evictions: 0,
        }
    }

    pub(crate) fn push(&mut self, features: Features, y: f64) {
        let features = features.sanitised();
        let key = bucket_key(&features);
        if self.total >= self.max_total && !self.evict_from_fullest(key) {
            return;
        }
        let per_bucket = self.per_bucket;
        let bucket = self.buckets.entry(key).or_default();
        if bucket.len() >= per_bucket {
            bucket.pop_front();
        } else {
            self.total += 1;
        }
        bucket.push_back(Row { features, y });
    }

    /// Makes room for one sample going to bucket `incoming`. Returns false when there is
    /// nothing to evict (cannot happen with `max_total >= 1`, kept for safety).
    fn evict_from_fullest(&mut self, incoming: u64) -> bool {
        // The incoming bucket evicts from itself when it is full anyway.
        if self
            .buckets
            .get(&incoming)
            .is_some_and(|b| b.len() >= self.per_bucket)
        {
            return true;
        }
        self.evictions += 1;
        let stale = self.evictions.is_multiple_of(RESCAN_EVERY)
            || self
                .victim
                .is_none_or(|k| self.buckets.get(&k).is_none_or(|b| b.len() <= 1));
        if stale {
            self.victim = self
                .buckets
                .iter()
                .max_by_key(|(_, b)| b.len())
                .map(|(k, _)| *k);
        }
        let Some(key) = self.victim else {
            return false;
        };
        if let Some(b) = self.buckets.get_mut(&key) {
            b.pop_front();
            self.total -= 1;
            if b.is_empty() {
                self.buckets.remove(&key);
            }
        }
        true
    }

    pub(crate) fn len(&self) -> usize {
        self.total
    }

    pub(crate) fn rows(&self) -> impl Iterator<Item = (&Features, f64)> + Clone {
        self.buckets
            .values()
            .flat_map(|b| b.iter().map(|r| (&r.features, r.y)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_keeps_the_newest() {
        let mut s = Store::new(3, 100);
        for i in 0..10 {
            s.push(Features::default(), f64::from(i));
        }
        assert_eq!(s.len(), 3);
        let mut ys: Vec<f64> = s.rows().map(|(_, y)| y).collect();
        ys.sort_by(f64::total_cmp);
        assert_eq!(ys, vec![7.0, 8.0, 9.0]);
    }

    #[test]
    fn rare_regimes_survive_a_flood_of_common_ones() {
        let mut s = Store::new(50, 1000);
        let deep_queue = Features {
            waiting: 20,
            ..Features::default()
        };
        for _ in 0..10 {
            s.push(deep_queue, 500.0);
        }
        for _ in 0..10_000 {
            s.push(Features::default(), 10.0);
        }
        assert_eq!(s.rows().filter(|(f, _)| f.waiting == 20).count(), 10);
    }

    #[test]
    fn global_cap_bounds_memory_across_many_buckets() {
        let mut s = Store::new(500, 200);
        for i in 0..5000_u32 {
            let f = Features {
                waiting: i % 13,
                kv_cache_usage: f64::from(i % 20) / 20.0,
                prefix_cache_score: f64::from(i % 4) / 4.0,
                ..Features::default()
            };
            s.push(f, 1.0);
        }
        assert_eq!(s.len(), 200);
        assert_eq!(s.rows().count(), 200);
    }
}
