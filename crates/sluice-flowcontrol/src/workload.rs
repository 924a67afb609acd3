//! Workload-aware prioritisation (a sluice extension, not upstream; reference
//! `flow-control.md` §9): the `X-Workload-Context` header, the workload registry and the
//! score used by the `workload-aware-ordering-policy`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::{ScoreParams, WorkloadConfig};

/// The request header carrying the workload context (HTTP header names are
/// case-insensitive; this is the lower-case form Envoy forwards).
pub const WORKLOAD_CONTEXT_HEADER: &str = "x-workload-context";
/// Workload id given to requests without a usable header.
pub const DEFAULT_WORKLOAD: &str = "default";
/// Workload id under which arrivals are counted once the registry is full.
pub const OVERFLOW_WORKLOAD: &str = "other";
/// Longest accepted `workload_id`; longer ones are treated as missing.
pub const MAX_WORKLOAD_ID_LEN: usize = 128;
/// Lowest criticality.
pub const MIN_CRITICALITY: u8 = 1;
/// Highest criticality.
pub const MAX_CRITICALITY: u8 = 5;

/// Buckets in the sliding rate window: the window slides in steps of `window / 12`.
const RATE_BUCKETS: usize = 12;
/// Smoothing of the average queue wait (as in the seed's code variant).
const WAIT_EMA_ALPHA: f64 = 0.2;

/// Who a request belongs to and how much it matters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadContext {
    /// The workload's id, e.g. `fraud-detection`.
    pub workload_id: Arc<str>,
    /// 1 (lowest) to 5 (highest).
    pub criticality: u8,
}

impl Default for WorkloadContext {
    fn default() -> Self {
        Self {
            workload_id: Arc::from(DEFAULT_WORKLOAD),
            criticality: 3,
        }
    }
}

#[derive(serde::Deserialize)]
struct HeaderBody {
    #[serde(default)]
    workload_id: Option<serde_json::Value>,
    #[serde(default)]
    criticality: Option<serde_json::Value>,
}

impl WorkloadContext {
    /// Reads an `X-Workload-Context` header value per the seed's rules: a missing header or
    /// invalid JSON gives the default workload at `default_criticality`; a criticality that
    /// is missing, not an integer, or outside 1–5 becomes `default_criticality` while the
    /// workload id is kept; an empty, non-string or over-long id becomes the default
    /// workload.
    ///
    /// Unlike the seed's fork (which mints a unique id per bad request), bad input maps to
    /// one shared `default` workload: unique ids would grow the registry without bound and
    /// let a client escape the request-rate penalty by sending garbage.
    pub fn from_header(value: Option<&str>, default_criticality: u8) -> Self {
        let fallback = || Self {
            workload_id: Arc::from(DEFAULT_WORKLOAD),
            criticality: default_criticality,
        };
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return fallback();
        };
        let Ok(body) = serde_json::from_str::<HeaderBody>(value) else {
            return fallback();
        };
        let criticality = body
            .criticality
            .and_then(|c| c.as_u64())
            .and_then(|c| u8::try_from(c).ok())
            .filter(|c| (MIN_CRITICALITY..=MAX_CRITICALITY).contains(c))
            .unwrap_or(default_criticality);
        let workload_id = match body.workload_id.as_ref().and_then(|v| v.as_str()) {
            Some(id) if !id.is_empty() && id.len() <= MAX_WORKLOAD_ID_LEN => Arc::from(id),
            _ => Arc::from(DEFAULT_WORKLOAD),
        };
        Self {
            workload_id,
            criticality,
        }
    }
}

/// The workload-aware score: higher dispatches first. Normalised terms per seed 003:
/// `w_wait·min(wait/max_wait, 1) + w_crit·criticality/5 − w_rate·min(rate/max_rate, 1)`.
#[inline]
pub fn score(params: &ScoreParams, wait: Duration, criticality: u8, rate: f64) -> f64 {
    let wait = (wait.as_secs_f64() / params.max_wait.as_secs_f64()).min(1.0);
    let crit = f64::from(criticality) / f64::from(MAX_CRITICALITY);
    let rate = (rate / params.max_rate).clamp(0.0, 1.0);
    params.wait_weight * wait + params.criticality_weight * crit - params.rate_weight * rate
}

/// What the registry knows about one workload, as a copy.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadStats {
    /// The workload's id.
    pub workload_id: Arc<str>,
    /// Requests ever seen (since the workload was last created).
    pub total_requests: u64,
    /// Requests queued, being processed or streaming their response.
    pub active_requests: u64,
    /// Requests per second over the sliding window.
    pub request_rate: f64,
    /// Exponential moving average of the queue wait of dispatched requests.
    pub average_wait: Duration,
    /// Requests dispatched from the queue.
    pub dispatched: u64,
}

/// One tracked workload. Shared by the registry and by every request of the workload so
/// the hot path never looks the workload up by name twice.
#[derive(Debug)]
pub struct WorkloadEntry {
    id: Arc<str>,
    active: AtomicU64,
    total: AtomicU64,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// Start of the bucket `head` counts into.
    head_start: Instant,
    head: usize,
    buckets: [u32; RATE_BUCKETS],
    first_seen: Instant,
    last_arrival: Instant,
    avg_wait_secs: f64,
    dispatched: u64,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            head_start: now,
            head: 0,
            buckets: [0; RATE_BUCKETS],
            first_seen: now,
            last_arrival: now,
            avg_wait_secs: 0.0,
            dispatched: 0,
        }
    }

    /// Moves the head forward to the bucket containing `now`, clearing skipped buckets.
    fn advance(&mut self, now: Instant, width: Duration) {
        let elapsed = now.saturating_duration_since(self.head_start);
        let steps = (elapsed.as_nanos() / width.as_nanos().max(1)) as usize;
        if steps == 0 {
            return;
        }
        if steps >= RATE_BUCKETS {
            self.buckets = [0; RATE_BUCKETS];
        } else {
            for _ in 0..steps {
                self.head = (self.head + 1) % RATE_BUCKETS;
                self.buckets[self.head] = 0;
            }
        }
        self.head_start += width * (steps.min(u32::MAX as usize) as u32);
    }

    fn rate(&mut self, now: Instant, window: Duration) -> f64 {
        let width = window / RATE_BUCKETS as u32;
        self.advance(now, width);
        let count: u64 = self.buckets.iter().map(|&c| u64::from(c)).sum();
        // A young workload is measured over its age, but never less than one bucket, so the
        // first request of a quiet workload does not look like a burst.
        let span = now
            .saturating_duration_since(self.first_seen)
            .clamp(width, window);
        count as f64 / span.as_secs_f64()
    }
}

impl WorkloadEntry {
    fn new(id: Arc<str>, now: Instant) -> Self {
        Self {
            id,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            window: Mutex::new(Window::new(now)),
        }
    }

    /// The workload's id.
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// Requests queued or in flight.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Acquire)
    }

    /// Requests per second over the sliding window ending at `now`.
    pub fn rate(&self, now: Instant, window: Duration) -> f64 {
        self.window.lock().rate(now, window)
    }

    fn decrement(&self) {
        // Saturating so a logic error can never wrap the count to 2^64.
        let _ = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
    }
}

/// Holds one unit of a workload's active count; dropping it (on any exit path: rejection,
/// timeout, disconnect, response complete) gives it back.
#[derive(Debug)]
pub struct ActiveToken {
    entry: Arc<WorkloadEntry>,
}

impl ActiveToken {
    /// The workload this token counts against.
    pub fn entry(&self) -> &Arc<WorkloadEntry> {
        &self.entry
    }
}

impl Drop for ActiveToken {
    fn drop(&mut self) {
        self.entry.decrement();
    }
}

/// Tracks every workload's totals, active requests, request rate and queue wait, with
/// idle workloads dropped by [`WorkloadRegistry::cleanup`].
#[derive(Debug)]
pub struct WorkloadRegistry {
    config: WorkloadConfig,
    map: Mutex<HashMap<Arc<str>, Arc<WorkloadEntry>>>,
}

impl WorkloadRegistry {
    /// An empty registry.
    pub fn new(config: WorkloadConfig) -> Self {
        Self {
            config,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The registry's settings.
    pub fn config(&self) -> &WorkloadConfig {
        &self.config
    }

    /// Records an arrival and returns the token that keeps it counted as active.
    pub fn arrive(&self, workload_id: &Arc<str>, now: Instant) -> ActiveToken {
        let entry = {
            let mut map = self.map.lock();
            let entry = match map.get(workload_id) {
                Some(e) => e.clone(),
                // One slot stays free for the overflow entry itself.
                None if map.len() + 1 >= self.config.max_workloads => map
                    .entry(Arc::from(OVERFLOW_WORKLOAD))
                    .or_insert_with_key(|k| Arc::new(WorkloadEntry::new(k.clone(), now)))
                    .clone(),
                None => {
                    let e = Arc::new(WorkloadEntry::new(workload_id.clone(), now));
                    map.insert(workload_id.clone(), e.clone());
                    e
                }
            };
            // Incremented under the map lock so cleanup never drops an entry that is
            // about to become active.
            entry.active.fetch_add(1, Ordering::AcqRel);
            entry
        };
        entry.total.fetch_add(1, Ordering::Relaxed);
        let width = self.config.window / RATE_BUCKETS as u32;
        let mut w = entry.window.lock();
        w.advance(now, width);
        let head = w.head;
        w.buckets[head] = w.buckets[head].saturating_add(1);
        w.last_arrival = now;
        drop(w);
        ActiveToken { entry }
    }

    /// Records that a request of `entry` left the queue after waiting `wait`.
    pub fn dispatched(&self, entry: &WorkloadEntry, wait: Duration) {
        let mut w = entry.window.lock();
        let secs = wait.as_secs_f64();
        w.avg_wait_secs = if w.dispatched == 0 {
            secs
        } else {
            WAIT_EMA_ALPHA * secs + (1.0 - WAIT_EMA_ALPHA) * w.avg_wait_secs
        };
        w.dispatched += 1;
    }

    /// The workload's request rate (0 for an unknown workload).
    pub fn rate(&self, workload_id: &str, now: Instant) -> f64 {
        let entry = self.map.lock().get(workload_id).cloned();
        entry.map_or(0.0, |e| e.rate(now, self.config.window))
    }

    /// A copy of one workload's figures.
    pub fn stats(&self, workload_id: &str, now: Instant) -> Option<WorkloadStats> {
        let entry = self.map.lock().get(workload_id).cloned()?;
        Some(self.stats_of(&entry, now))
    }

    fn stats_of(&self, e: &WorkloadEntry, now: Instant) -> WorkloadStats {
        let mut w = e.window.lock();
        let request_rate = w.rate(now, self.config.window);
        WorkloadStats {
            workload_id: e.id.clone(),
            total_requests: e.total.load(Ordering::Relaxed),
            active_requests: e.active(),
            request_rate,
            average_wait: Duration::try_from_secs_f64(w.avg_wait_secs).unwrap_or_default(),
            dispatched: w.dispatched,
        }
    }

    /// Every tracked workload's figures.
    pub fn all_stats(&self, now: Instant) -> Vec<WorkloadStats> {
        let entries: Vec<_> = self.map.lock().values().cloned().collect();
        entries.iter().map(|e| self.stats_of(e, now)).collect()
    }

    /// Sum of active requests over all workloads.
    pub fn total_active(&self) -> u64 {
        self.map.lock().values().map(|e| e.active()).sum()
    }

    /// Number of tracked workloads.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether no workload is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops workloads with no active request and no arrival for `idle_timeout`; returns
    /// how many were dropped.
    pub fn cleanup(&self, now: Instant) -> usize {
        let idle = self.config.idle_timeout;
        let mut map = self.map.lock();
        let before = map.len();
        map.retain(|_, e| {
            e.active() > 0 || now.saturating_duration_since(e.window.lock().last_arrival) < idle
        });
        before - map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_rules_follow_the_seed() {
        let parse = |v: Option<&str>| WorkloadContext::from_header(v, 3);
        let ok = parse(Some(
            r#"{"workload_id": "fraud-detection", "criticality": 5}"#,
        ));
        assert_eq!((&*ok.workload_id, ok.criticality), ("fraud-detection", 5));
        for (input, id, crit) in [
            (None, "default", 3),
            (Some(""), "default", 3),
            (Some("not json"), "default", 3),
            (Some(r#"{"workload_id": "a", "criticality": 0}"#), "a", 3),
            (Some(r#"{"workload_id": "a", "criticality": -1}"#), "a", 3),
            (Some(r#"{"workload_id": "a", "criticality": 6}"#), "a", 3),
            (Some(r#"{"workload_id": "a", "criticality": 4.5}"#), "a", 3),
            (Some(r#"{"workload_id": "a", "criticality": "5"}"#), "a", 3),
            (Some(r#"{"workload_id": "a"}"#), "a", 3),
            (
                Some(r#"{"workload_id": "", "criticality": 1}"#),
                "default",
                1,
            ),
            (
                Some(r#"{"workload_id": 7, "criticality": 5}"#),
                "default",
                5,
            ),
            (Some(r#"{"criticality": 1}"#), "default", 1),
            (
                Some(r#"{"workload_id": "team/a b:ü", "criticality": 1}"#),
                "team/a b:ü",
                1,
            ),
        ] {
            let got = parse(input);
            assert_eq!(
                (&*got.workload_id, got.criticality),
                (id, crit),
                "{input:?}"
            );
        }
        let long = format!(
            r#"{{"workload_id": "{}", "criticality": 2}}"#,
            "x".repeat(MAX_WORKLOAD_ID_LEN + 1)
        );
        assert_eq!(&*parse(Some(&long)).workload_id, "default");
        // A configured default criticality is used for bad values.
        assert_eq!(WorkloadContext::from_header(Some("{"), 2).criticality, 2);
    }

    #[test]
    fn score_matches_the_seed_formula_and_caps() {
        let p = ScoreParams::default();
        let s = score(&p, Duration::from_secs(30), 5, 50.0);
        assert!((s - (0.4 * 0.5 + 0.4 * 1.0 - 0.2 * 0.5)).abs() < 1e-12);
        // Caps: waiting longer than 60 s or sending faster than 100 req/s changes nothing.
        assert_eq!(
            score(&p, Duration::from_secs(60), 1, 100.0),
            score(&p, Duration::from_secs(600), 1, 1e6)
        );
        // §9.4: criticality 1 overtakes a fresh criticality 5 after 48 s of waiting.
        assert!(score(&p, Duration::from_secs(47), 1, 0.0) < score(&p, Duration::ZERO, 5, 0.0));
        assert!(score(&p, Duration::from_secs(49), 1, 0.0) > score(&p, Duration::ZERO, 5, 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_is_measured_over_a_sliding_window() {
        let reg = WorkloadRegistry::new(WorkloadConfig::default());
        let id: Arc<str> = Arc::from("noisy");
        let t0 = Instant::now();
        // 50 req/s for 60 s.
        for i in 0..3000u32 {
            drop(reg.arrive(&id, t0 + Duration::from_millis(20) * i));
        }
        let at = t0 + Duration::from_secs(60);
        let r = reg.rate("noisy", at);
        assert!((45.0..=55.0).contains(&r), "rate {r}");
        // Half a window later about half the requests have slid out.
        let r = reg.rate("noisy", at + Duration::from_secs(30));
        assert!((20.0..=30.0).contains(&r), "rate {r}");
        assert_eq!(reg.rate("noisy", at + Duration::from_secs(61)), 0.0);
        // One request of a brand-new workload is not mistaken for a burst.
        drop(reg.arrive(&Arc::from("quiet"), at));
        assert!(reg.rate("quiet", at) <= 0.2 + 1e-9);
        assert_eq!(reg.stats("noisy", at).unwrap().total_requests, 3000);
    }

    #[tokio::test(start_paused = true)]
    async fn active_counts_follow_tokens_and_idle_workloads_are_cleaned() {
        let cfg = WorkloadConfig {
            idle_timeout: Duration::from_secs(300),
            ..WorkloadConfig::default()
        };
        let reg = WorkloadRegistry::new(cfg);
        let now = Instant::now();
        let a = reg.arrive(&Arc::from("a"), now);
        let a2 = reg.arrive(&Arc::from("a"), now);
        drop(reg.arrive(&Arc::from("b"), now));
        assert_eq!(reg.stats("a", now).unwrap().active_requests, 2);
        assert_eq!(reg.stats("b", now).unwrap().active_requests, 0);
        let later = now + Duration::from_secs(301);
        // "a" still has requests in flight, so only "b" goes.
        assert_eq!(reg.cleanup(later), 1);
        assert!(reg.stats("b", later).is_none());
        drop((a, a2));
        assert_eq!(reg.total_active(), 0);
        assert_eq!(reg.cleanup(later), 1);
        assert!(reg.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn registry_is_bounded() {
        let reg = WorkloadRegistry::new(WorkloadConfig {
            max_workloads: 3,
            ..WorkloadConfig::default()
        });
        let now = Instant::now();
        let tokens: Vec<_> = (0..10)
            .map(|i| reg.arrive(&Arc::from(format!("w{i}")), now))
            .collect();
        assert_eq!(reg.len(), 3);
        assert_eq!(
            reg.stats(OVERFLOW_WORKLOAD, now).unwrap().active_requests,
            8
        );
        drop(tokens);
        assert_eq!(reg.total_active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_average_is_smoothed() {
        let reg = WorkloadRegistry::new(WorkloadConfig::default());
        let now = Instant::now();
        let t = reg.arrive(&Arc::from("a"), now);
        reg.dispatched(t.entry(), Duration::from_secs(10));
        reg.dispatched(t.entry(), Duration::ZERO);
        let avg = reg.stats("a", now).unwrap().average_wait;
        assert_eq!(avg, Duration::from_secs(8));
    }
}
