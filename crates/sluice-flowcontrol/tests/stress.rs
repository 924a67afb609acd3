//! Every counter returns to zero after runs mixing completions, errors, cancellations,
//! aborts, TTL expiries, capacity rejections and shutdown, on a multi-threaded runtime where
//! dispatch and cancellation really race. The sleeps are the simulated work, not
//! synchronisation: the assertions hold for every interleaving.

#![allow(
    clippy::field_reassign_with_default,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: helpers outside #[test] fns fail loudly; configs tweak a default"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_flowcontrol::*;

/// A tiny deterministic generator so each run uses the same mix.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

type Seen = Arc<parking_lot::Mutex<std::collections::BTreeMap<&'static str, u64>>>;

fn note(seen: &Seen, what: &'static str) {
    *seen.lock().entry(what).or_default() += 1;
}

/// Returns how many tasks started (an abort can land before a task first runs).
async fn run_round(fc: &FlowController, rng: &mut Lcg, shutdown_midway: bool, seen: &Seen) -> u64 {
    let started = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut aborts = Vec::new();
    for i in 0..100u64 {
        let fc = fc.clone();
        let kind = rng.next(5);
        let hold = Duration::from_micros(rng.next(2000));
        let r = FlowRequest {
            priority: rng.next(3) as i32 - 1,
            fairness_id: Some(Arc::from(format!("flow{}", rng.next(4)))),
            workload: WorkloadContext {
                workload_id: Arc::from(format!("w{}", rng.next(7))),
                criticality: 1 + rng.next(5) as u8,
            },
            bytes: rng.next(1000),
            ttl: (kind == 4).then(|| Duration::from_millis(3)),
            ..FlowRequest::default()
        };
        let started = started.clone();
        let seen = seen.clone();
        let handle = tokio::spawn(async move {
            // Same poll as admit's arrival bookkeeping, so the two cannot be split by an abort.
            started.fetch_add(1, Ordering::Relaxed);
            match kind {
                // Client gives up while queued (or just after dispatch).
                1 => match tokio::time::timeout(hold, fc.admit(r)).await {
                    Err(_) => note(&seen, "gave up"),
                    Ok(r) => note(
                        &seen,
                        r.map(drop).err().map_or("dispatched", Outcome::label),
                    ),
                },
                // Scheduling fails right after admission: the guard is dropped on the error path.
                2 => {
                    let r = fc.admit(r).await;
                    note(&seen, r.as_ref().err().map_or("dispatched", |o| o.label()));
                    if let Ok(guard) = r {
                        let result: Result<(), &str> = Err("no endpoint matched");
                        if result.is_err() {
                            drop(guard);
                        }
                    }
                }
                _ => {
                    let r = fc.admit(r).await;
                    note(&seen, r.as_ref().err().map_or("dispatched", |o| o.label()));
                    if let Ok(guard) = r {
                        tokio::time::sleep(hold).await;
                        drop(guard);
                    }
                }
            }
        });
        if kind == 3 && i % 2 == 0 {
            aborts.push(handle);
        } else {
            tasks.push(handle);
        }
    }
    tokio::task::yield_now().await;
    for a in &aborts {
        a.abort();
    }
    if shutdown_midway {
        fc.shutdown();
    }
    for t in tasks.into_iter().chain(aborts) {
        let _ = t.await;
    }
    started.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_return_to_zero_under_concurrency() {
    let mut cfg = FlowControlConfig::default();
    cfg.max_requests = 60;
    cfg.default_band.max_bytes = 20_000;
    cfg.default_band.ordering = OrderingPolicy::WorkloadAware(ScoreParams::default());
    cfg.default_negative_band.fairness = FairnessPolicy::RoundRobin;
    let mut rng = Lcg(42);
    let seen = Seen::default();
    for round in 0..20 {
        let fc = FlowController::new(cfg.clone(), Arc::new(ConcurrencyLimit::new(4)));
        let started = run_round(&fc, &mut rng, round == 19, &seen).await;
        assert_eq!(fc.queued(), 0, "round {round}");
        assert_eq!(fc.queued_bytes(), 0, "round {round}");
        assert_eq!(fc.in_flight(), 0, "round {round}");
        assert_eq!(fc.registry().total_active(), 0, "round {round}");
        let total: u64 = fc
            .registry()
            .all_stats(tokio::time::Instant::now())
            .iter()
            .map(|s| s.total_requests)
            .sum();
        assert_eq!(
            total, started,
            "round {round}: every arrival is counted once"
        );
    }
    // Every exit path was taken at least once, or the test proves less than it claims.
    let seen = seen.lock();
    for path in [
        "dispatched",
        "gave up",
        "RejectedCapacity",
        "EvictedTTL",
        "EvictedOther",
    ] {
        assert!(
            seen.get(path).copied().unwrap_or(0) > 0,
            "{path} never happened: {seen:?}"
        );
    }
}
