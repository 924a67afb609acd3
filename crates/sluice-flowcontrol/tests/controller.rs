//! Behaviour of the flow controller as the picker sees it. Time is tokio's paused clock, so
//! waits of seconds cost nothing and every run is the same.

#![allow(
    clippy::field_reassign_with_default,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: helpers outside #[test] fns fail loudly; configs tweak a default"
)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use sluice_flowcontrol::*;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Lets every runnable task run until `cond` holds (bounded, so a bug fails instead of
/// hanging).
async fn until(mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never became true");
}

fn wl(id: &str, criticality: u8) -> WorkloadContext {
    WorkloadContext {
        workload_id: Arc::from(id),
        criticality,
    }
}

fn req(priority: i32, flow: &str, workload: WorkloadContext) -> FlowRequest {
    FlowRequest {
        priority,
        fairness_id: Some(Arc::from(flow)),
        workload,
        bytes: 100,
        ..FlowRequest::default()
    }
}

fn config(ordering: OrderingPolicy, fairness: FairnessPolicy) -> FlowControlConfig {
    let mut c = FlowControlConfig::default();
    c.default_band.ordering = ordering.clone();
    c.default_band.fairness = fairness;
    c.default_negative_band.ordering = ordering;
    c.default_negative_band.fairness = fairness;
    c
}

type Log = Arc<Mutex<Vec<String>>>;

/// Spawns a request that, once dispatched, logs `tag` and completes at once.
fn spawn_logged(
    fc: &FlowController,
    r: FlowRequest,
    tag: String,
    log: &Log,
) -> JoinHandle<Result<(), Outcome>> {
    let fc = fc.clone();
    let log = log.clone();
    tokio::spawn(async move {
        let guard = fc.admit(r).await?;
        log.lock().push(tag);
        drop(guard);
        Ok(())
    })
}

/// A controller whose pool holds one request at a time, with that slot taken, so
/// everything admitted next queues until `blocker` is dropped.
async fn one_slot(mut config: FlowControlConfig) -> (FlowController, AdmissionGuard) {
    // Completions wake the dispatcher themselves; no need to poll saturation.
    config.recheck_interval = Duration::from_secs(3600);
    let fc = FlowController::new(config, Arc::new(ConcurrencyLimit::new(1)));
    let blocker = fc.admit(FlowRequest::default()).await.unwrap();
    (fc, blocker)
}

#[tokio::test(start_paused = true)]
async fn admits_at_once_while_the_pool_has_room() {
    let fc = FlowController::new(
        FlowControlConfig::default(),
        Arc::new(ConcurrencyLimit::new(2)),
    );
    let a = fc.admit(req(0, "f", wl("w", 3))).await.unwrap();
    let b = fc.admit(req(0, "f", wl("w", 3))).await.unwrap();
    assert_eq!(a.queue_wait(), Duration::ZERO);
    assert_eq!((fc.in_flight(), fc.queued()), (2, 0));
    assert_eq!(fc.workload_stats("w").unwrap().active_requests, 2);
    // The third waits for a slot and gets the one `a` frees.
    let fc2 = fc.clone();
    let c = tokio::spawn(async move { fc2.admit(req(0, "f", wl("w", 3))).await });
    until(|| fc.queued() == 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(a);
    let c = c.await.unwrap().unwrap();
    assert_eq!(c.queue_wait(), Duration::from_secs(2));
    drop((b, c));
    assert_eq!(
        (fc.in_flight(), fc.queued(), fc.registry().total_active()),
        (0, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn higher_bands_always_dispatch_first() {
    let (fc, blocker) = one_slot(FlowControlConfig::default()).await;
    let log = Log::default();
    let mut tasks = Vec::new();
    // Interleaved arrivals; lower bands arrive first so FCFS alone would get it wrong.
    for round in 0..5 {
        for p in [-5, 0, 3, 10] {
            tasks.push(spawn_logged(
                &fc,
                req(p, "f", wl("w", 3)),
                format!("{p}"),
                &log,
            ));
        }
        until(|| fc.queued() == (round + 1) * 4).await;
    }
    until(|| fc.queued() == 20).await;
    drop(blocker);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let got: Vec<i32> = log.lock().iter().map(|s| s.parse().unwrap()).collect();
    let mut want = got.clone();
    want.sort_by(|a, b| b.cmp(a));
    assert_eq!(got, want, "dispatch order must be by band, highest first");
    assert_eq!(got.len(), 20);
}

#[tokio::test(start_paused = true)]
async fn a_closed_high_band_blocks_lower_bands() {
    // Holdback: band 10 may dispatch up to saturation 1.0, band 0 only below 0.5.
    let mut cfg = FlowControlConfig::default();
    cfg.usage_limit = UsageLimitPolicy::PriorityHoldback {
        max_ceiling: 1.0,
        min_ceiling: 0.5,
        by_value: false,
    };
    cfg.bands.insert(10, BandConfig::default());
    cfg.bands.insert(0, BandConfig::default());
    let sat = Arc::new(ManualSaturation::default());
    sat.set(0.7);
    let fc = FlowController::new(cfg, sat.clone());
    // The high band still has room at 0.7 and is admitted at once; the low band waits.
    let hi = fc.admit(req(10, "f", wl("w", 3))).await.unwrap();
    let log = Log::default();
    let lo = spawn_logged(&fc, req(0, "f", wl("w", 3)), "lo".into(), &log);
    until(|| fc.queued() == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        log.lock().is_empty(),
        "band 0 must wait above its 0.5 ceiling"
    );
    sat.set(0.4);
    fc.capacity_changed();
    lo.await.unwrap().unwrap();
    drop(hi);
    // Head-of-line: with band 10 blocked (saturation 1.0), band 0 must not overtake it even
    // though its own ceiling is irrelevant.
    sat.set(1.0);
    let h = spawn_logged(&fc, req(10, "f", wl("w", 3)), "hi".into(), &log);
    let l = spawn_logged(&fc, req(0, "f", wl("w", 3)), "lo2".into(), &log);
    until(|| fc.queued() == 2).await;
    sat.set(0.4);
    fc.capacity_changed();
    h.await.unwrap().unwrap();
    l.await.unwrap().unwrap();
    assert_eq!(*log.lock(), ["lo", "hi", "lo2"]);
}

/// Each workload's share of the first `n` dispatches when a noisy flow queued 200 requests
/// before a quiet one queued 20.
async fn quiet_share(ordering: OrderingPolicy, fairness: FairnessPolicy, n: usize) -> f64 {
    let (fc, blocker) = one_slot(config(ordering, fairness)).await;
    let log = Log::default();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        tasks.push(spawn_logged(
            &fc,
            req(0, "noisy", wl("noisy", 3)),
            "noisy".into(),
            &log,
        ));
    }
    until(|| fc.queued() == 200).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        tasks.push(spawn_logged(
            &fc,
            req(0, "quiet", wl("quiet", 3)),
            "quiet".into(),
            &log,
        ));
    }
    until(|| fc.queued() == 220).await;
    drop(blocker);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let log = log.lock();
    assert_eq!(log.len(), 220);
    log.iter().take(n).filter(|s| *s == "quiet").count() as f64 / n as f64
}

#[tokio::test(start_paused = true)]
async fn a_quiet_flow_is_not_starved_by_a_noisy_one() {
    // Round-robin between flows: the quiet flow gets half of the dispatches while both wait.
    let rr = quiet_share(OrderingPolicy::Fcfs, FairnessPolicy::RoundRobin, 40).await;
    assert_eq!(rr, 0.5);
    // Workload-aware: the noisy workload's request rate sinks it, so the quiet one's 20
    // requests all go before any more noisy ones.
    let wa = quiet_share(
        OrderingPolicy::WorkloadAware(ScoreParams::default()),
        FairnessPolicy::GlobalStrict,
        20,
    )
    .await;
    assert_eq!(wa, 1.0);
    // The baseline these policies fix: global FCFS serves the backlog first.
    let fcfs = quiet_share(OrderingPolicy::Fcfs, FairnessPolicy::GlobalStrict, 40).await;
    assert_eq!(fcfs, 0.0);
}

#[tokio::test(start_paused = true)]
async fn criticality_orders_a_band() {
    let (fc, blocker) = one_slot(config(
        OrderingPolicy::WorkloadAware(ScoreParams::default()),
        FairnessPolicy::GlobalStrict,
    ))
    .await;
    let log = Log::default();
    let mut tasks = Vec::new();
    for (name, crit) in [("A", 1), ("B", 5), ("C", 3)] {
        tasks.push(spawn_logged(
            &fc,
            req(0, "f", wl(name, crit)),
            name.into(),
            &log,
        ));
        until(|| fc.queued() == tasks.len() as u64).await;
    }
    drop(blocker);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(*log.lock(), ["B", "C", "A"]);
}

#[tokio::test(start_paused = true)]
async fn a_long_waiting_low_criticality_request_overtakes_fresh_critical_ones() {
    let mut cfg = config(
        OrderingPolicy::WorkloadAware(ScoreParams::default()),
        FairnessPolicy::GlobalStrict,
    );
    cfg.default_request_ttl = Duration::ZERO;
    let (fc, blocker) = one_slot(cfg).await;
    let start = Instant::now();
    let times: Arc<Mutex<Vec<(String, Duration, Duration)>>> = Arc::default();
    // The pool serves one request per second; a fresh criticality-5 request arrives a
    // quarter second before each slot frees, and one criticality-1 request waits from the
    // start.
    let spawn = |r: FlowRequest, tag: &str| {
        let (fc, times, tag) = (fc.clone(), times.clone(), tag.to_owned());
        tokio::spawn(async move {
            let arrived = Instant::now();
            let guard = fc.admit(r).await.unwrap();
            times.lock().push((tag, arrived - start, arrived.elapsed()));
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(guard);
        })
    };
    let low = spawn(req(0, "f", wl("batch", 1)), "low");
    until(|| fc.queued() == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut high = Vec::new();
    let mut blocker = Some(blocker);
    for _ in 0..70 {
        high.push(spawn(req(0, "f", wl("critical", 5)), "high"));
        tokio::time::sleep(Duration::from_millis(250)).await;
        drop(blocker.take());
        tokio::time::sleep(Duration::from_millis(750)).await;
    }
    low.await.unwrap();
    for h in high {
        h.await.unwrap();
    }
    let times = times.lock();
    let (_, _, low_wait) = times.iter().find(|(t, _, _)| t == "low").unwrap().clone();
    // 0.4·w/60 + 0.08 > 0.4·0.25/60 + 0.4  ⇔  w > 48.25 s (less a little for the rate term).
    assert!(
        (Duration::from_secs(48)..Duration::from_secs(52)).contains(&low_wait),
        "low-criticality wait {low_wait:?}"
    );
    // Before it went, every critical request went straight through.
    for (tag, arrived, wait) in times.iter() {
        if tag == "high" && *arrived + *wait < low_wait {
            assert!(
                *wait <= Duration::from_millis(250),
                "critical request at {arrived:?} waited {wait:?}"
            );
        }
    }
    drop(times);
    assert_eq!(fc.registry().total_active(), 0);
}

#[tokio::test(start_paused = true)]
async fn edf_and_slo_deadline_orderings() {
    // EDF: the shortest TTL goes first regardless of arrival.
    let (fc, blocker) = one_slot(config(OrderingPolicy::Edf, FairnessPolicy::GlobalStrict)).await;
    let log = Log::default();
    let mut tasks = Vec::new();
    for (tag, ttl) in [("long", 50), ("none", 0), ("short", 10)] {
        let r = FlowRequest {
            ttl: Some(Duration::from_secs(ttl)),
            ..req(0, "f", wl("w", 3))
        };
        tasks.push(spawn_logged(&fc, r, tag.into(), &log));
        until(|| fc.queued() == tasks.len() as u64).await;
    }
    drop(blocker);
    for t in tasks.drain(..) {
        t.await.unwrap().unwrap();
    }
    assert_eq!(*log.lock(), ["short", "long", "none"]);

    // SLO deadline: the tightest x-slo-ttft-ms goes first; no SLO goes last.
    let (fc, blocker) = one_slot(config(
        OrderingPolicy::SloDeadline,
        FairnessPolicy::GlobalStrict,
    ))
    .await;
    let log = Log::default();
    for (tag, slo) in [
        ("none", None),
        ("loose", Some("2000")),
        ("tight", Some("200")),
        ("bad", Some("soon")),
    ] {
        let r = FlowRequest {
            slo_ttft: slo.and_then(parse_slo_ttft_ms),
            ..req(0, "f", wl("w", 3))
        };
        tasks.push(spawn_logged(&fc, r, tag.into(), &log));
        until(|| fc.queued() == tasks.len() as u64).await;
    }
    drop(blocker);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(*log.lock(), ["tight", "loose", "none", "bad"]);
}

#[tokio::test(start_paused = true)]
async fn full_queues_reject_with_429() {
    let mut cfg = FlowControlConfig::default();
    cfg.max_requests = 3;
    cfg.bands.insert(
        5,
        BandConfig {
            max_requests: 1,
            ..BandConfig::default()
        },
    );
    cfg.bands.insert(
        7,
        BandConfig {
            max_bytes: 1000,
            ..BandConfig::default()
        },
    );
    let sat = Arc::new(ManualSaturation::default());
    sat.set(1.0);
    let fc = FlowController::new(cfg, sat.clone());
    let spawn = |r: FlowRequest| {
        let fc = fc.clone();
        tokio::spawn(async move { fc.admit(r).await.map(drop) })
    };
    let a = spawn(req(5, "f", wl("w", 3)));
    until(|| fc.queued() == 1).await;
    // Band 5 holds one request.
    let err = fc.admit(req(5, "f", wl("w", 3))).await.unwrap_err();
    assert_eq!(
        (err, err.http_status(), err.reason()),
        (Outcome::RejectedCapacity, 429, "rejected-saturated")
    );
    // Band 7 holds 1000 bytes.
    let err = fc
        .admit(FlowRequest {
            bytes: 1001,
            ..req(7, "f", wl("w", 3))
        })
        .await
        .unwrap_err();
    assert_eq!(err, Outcome::RejectedCapacity);
    let b = spawn(FlowRequest {
        bytes: 1000,
        ..req(7, "f", wl("w", 3))
    });
    let c = spawn(req(0, "f", wl("w", 3)));
    until(|| fc.queued() == 3).await;
    assert_eq!(fc.queued_bytes(), 1200);
    // The global limit of 3 is reached, even for an empty band.
    assert_eq!(
        fc.admit(req(1, "f", wl("w", 3))).await.unwrap_err(),
        Outcome::RejectedCapacity
    );
    // Rejected requests are not counted as active.
    assert_eq!(fc.workload_stats("w").unwrap().active_requests, 3);
    sat.set(0.0);
    fc.capacity_changed();
    for t in [a, b, c] {
        t.await.unwrap().unwrap();
    }
    assert_eq!(fc.registry().total_active(), 0);
}

#[tokio::test(start_paused = true)]
async fn ttl_expiry_is_429_or_503_without_endpoints() {
    let mut cfg = FlowControlConfig::default();
    cfg.default_request_ttl = Duration::from_secs(10);
    cfg.no_endpoint_request_ttl = Duration::from_secs(3);
    let sat = Arc::new(ManualSaturation::default());
    sat.set(1.0);
    let fc = FlowController::new(cfg, sat.clone());
    let start = Instant::now();
    let err = fc.admit(req(0, "f", wl("w", 3))).await.unwrap_err();
    assert_eq!(
        (err, err.http_status(), err.reason()),
        (Outcome::EvictedTtl, 429, "rejected-ttl-expired")
    );
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    // A per-request TTL wins over the default.
    let start = Instant::now();
    let r = FlowRequest {
        ttl: Some(Duration::from_secs(2)),
        ..req(0, "f", wl("w", 3))
    };
    assert_eq!(fc.admit(r).await.unwrap_err(), Outcome::EvictedTtl);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    // With no endpoints the shorter no-endpoint TTL applies and the answer is 503.
    sat.set(0.0);
    sat.set_has_endpoints(false);
    let start = Instant::now();
    let err = fc.admit(req(0, "f", wl("w", 3))).await.unwrap_err();
    assert_eq!((err, err.http_status()), (Outcome::EvictedNoEndpoints, 503));
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    // Endpoints that come back in time let a waiting request through.
    let fc2 = fc.clone();
    let waiting = tokio::spawn(async move { fc2.admit(req(0, "f", wl("w", 3))).await.map(drop) });
    until(|| fc.queued() == 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    sat.set_has_endpoints(true);
    waiting.await.unwrap().unwrap();
    assert_eq!(
        (fc.queued(), fc.in_flight(), fc.registry().total_active()),
        (0, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_disconnected_client_leaves_the_queue_at_once() {
    let sat = Arc::new(ManualSaturation::default());
    sat.set(1.0);
    let fc = FlowController::new(FlowControlConfig::default(), sat.clone());
    // Dropping the future (what a cancelled ext_proc stream does) frees the slot.
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        fc.admit(FlowRequest {
            bytes: 500,
            ..req(0, "f", wl("w", 3))
        }),
    )
    .await;
    assert!(r.is_err());
    assert_eq!((fc.queued(), fc.queued_bytes()), (0, 0));
    assert_eq!(fc.workload_stats("w").unwrap().active_requests, 0);
    // An aborted task too, and the freed capacity goes to the next request.
    let fc2 = fc.clone();
    let gone = tokio::spawn(async move { fc2.admit(req(0, "f", wl("w", 3))).await.map(drop) });
    let log = Log::default();
    until(|| fc.queued() == 1).await;
    let stays = spawn_logged(&fc, req(0, "f", wl("w", 3)), "stays".into(), &log);
    until(|| fc.queued() == 2).await;
    gone.abort();
    until(|| fc.queued() == 1).await;
    sat.set(0.0);
    fc.capacity_changed();
    stays.await.unwrap().unwrap();
    assert!(gone.await.unwrap_err().is_cancelled());
    assert_eq!(*log.lock(), ["stays"]);
    assert_eq!((fc.in_flight(), fc.registry().total_active()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_client_leaving_as_it_is_dispatched_frees_its_slot() {
    // The race: the dispatcher hands out the permit, and the client's future is dropped
    // before it wakes up to take it.
    let (fc, blocker) = one_slot(FlowControlConfig::default()).await;
    let fc2 = fc.clone();
    let task = tokio::spawn(async move { fc2.admit(req(0, "f", wl("w", 3))).await.map(drop) });
    until(|| fc.queued() == 1).await;
    drop(blocker); // wakes the dispatcher first...
    task.abort(); // ...then the cancellation
    assert!(task.await.unwrap_err().is_cancelled());
    until(|| fc.in_flight() == 0).await;
    assert_eq!((fc.queued(), fc.registry().total_active()), (0, 0));
    // The slot really is free.
    drop(fc.admit(req(0, "f", wl("w", 3))).await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn shutdown_answers_503() {
    let sat = Arc::new(ManualSaturation::default());
    sat.set(1.0);
    let fc = FlowController::new(FlowControlConfig::default(), sat);
    let fc2 = fc.clone();
    let waiting = tokio::spawn(async move { fc2.admit(req(0, "f", wl("w", 3))).await.map(drop) });
    until(|| fc.queued() == 1).await;
    fc.shutdown();
    let err = waiting.await.unwrap().unwrap_err();
    assert_eq!(
        (err, err.http_status(), err.reason()),
        (Outcome::ShuttingDown, 503, "rejected-shutting-down")
    );
    assert_eq!(
        fc.admit(req(0, "f", wl("w", 3))).await.unwrap_err(),
        Outcome::ShuttingDown
    );
    assert_eq!(fc.registry().total_active(), 0);
}

#[tokio::test(start_paused = true)]
async fn metrics_have_upstream_names_and_bounded_labels() {
    let mut cfg = FlowControlConfig::default();
    cfg.workload.max_metric_workloads = 2;
    let (fc, blocker) = one_slot(cfg).await;
    let mut registry = Registry::default();
    fc.register(registry.sub_registry_with_prefix("inference_extension"));
    let log = Log::default();
    let mut tasks = Vec::new();
    for i in 0..5 {
        tasks.push(spawn_logged(
            &fc,
            req(2, &format!("flow{i}"), wl(&format!("w{i}"), 3)),
            String::new(),
            &log,
        ));
    }
    until(|| fc.queued() == 5).await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(
            r#"inference_extension_flow_control_queue_size{fairness_id="flow3",priority="2"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"inference_extension_flow_control_queue_bytes{fairness_id="flow3",priority="2"} 100"#
        ),
        "{text}"
    );
    // Six workloads (five queued plus the blocker's), two labels allowed: two of their own
    // plus "other" with the rest.
    let active: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("inference_extension_flow_control_workload_active_requests{"))
        .collect();
    assert_eq!(active.len(), 3, "{text}");
    assert!(
        active
            .iter()
            .any(|l| l.contains(r#"workload_id="other"} 4"#)),
        "{active:?}"
    );
    drop(blocker);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"inference_extension_flow_control_requests_total{outcome="Dispatched",priority="2"} 5"#),
        "{text}"
    );
    assert!(
        text.contains("inference_extension_flow_control_request_queue_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(
        text.contains("inference_extension_flow_control_dispatch_cycle_duration_seconds_count"),
        "{text}"
    );
    assert!(
        text.contains("inference_extension_flow_control_pool_saturation"),
        "{text}"
    );
}

/// Saturation from a load only the "servers" know about (like pod metrics), blind to the
/// controller's own in-flight count.
#[derive(Debug, Default)]
struct ServerLoad {
    load: std::sync::atomic::AtomicU64,
    capacity: std::sync::atomic::AtomicU64,
}

impl SaturationSource for ServerLoad {
    fn saturation(&self, _in_flight: u64) -> f64 {
        use std::sync::atomic::Ordering::SeqCst;
        match self.capacity.load(SeqCst) {
            0 => 1.0,
            cap => self.load.load(SeqCst) as f64 / cap as f64,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn saturation_is_reread_after_each_dispatch_reaches_the_server() {
    use std::sync::atomic::Ordering::SeqCst;
    let servers = Arc::new(ServerLoad::default());
    let fc = FlowController::new(FlowControlConfig::default(), servers.clone());
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (fc, servers) = (fc.clone(), servers.clone());
        tasks.push(tokio::spawn(async move {
            let guard = fc.admit(req(0, "f", wl("w", 3))).await.unwrap();
            // The request reaches a server, which now reports more load.
            servers.load.fetch_add(1, SeqCst);
            guard
        }));
    }
    until(|| fc.queued() == 10).await;
    servers.capacity.store(3, SeqCst);
    fc.capacity_changed();
    until(|| fc.queued() == 7).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Releasing all ten at once on the stale reading would have overloaded the servers.
    assert_eq!(
        (fc.queued(), fc.in_flight(), servers.load.load(SeqCst)),
        (7, 3, 3)
    );
    fc.shutdown();
    let results: Vec<_> = futures_join(tasks).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
}

async fn futures_join<T>(tasks: Vec<JoinHandle<T>>) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await);
    }
    out
}

#[tokio::test(start_paused = true)]
async fn an_owned_admission_can_be_stored_and_polled_by_a_state_machine() {
    fn is_send_static<T: Send + 'static>(_: &T) {}
    let sat = Arc::new(ManualSaturation::default());
    let fc = FlowController::new(FlowControlConfig::default(), sat.clone());
    // Room in the pool: ready on the first poll, as a synchronous session needs.
    let mut adm = fc.admit_owned(req(0, "f", wl("w", 3)));
    is_send_static(&adm);
    let first =
        std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut adm).poll(cx)))
            .await;
    let guard = match first {
        std::task::Poll::Ready(r) => r.unwrap(),
        std::task::Poll::Pending => panic!("an unsaturated pool must admit on the first poll"),
    };
    drop(guard);
    // Saturated: pending until capacity frees; dropping it (stream reset) leaves the queue.
    sat.set(1.0);
    let mut adm = fc.admit_owned(req(0, "f", wl("w", 3)));
    let polled =
        std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut adm).poll(cx)))
            .await;
    assert!(polled.is_pending());
    assert_eq!(fc.queued(), 1);
    drop(adm);
    assert_eq!((fc.queued(), fc.registry().total_active()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn requests_are_built_from_headers() {
    let fc = FlowController::new(
        FlowControlConfig::default(),
        Arc::new(ManualSaturation::default()),
    );
    let headers = [
        ("x-gateway-inference-fairness-id", "tenant-a"),
        (
            "x-workload-context",
            r#"{"workload_id": "fraud-detection", "criticality": 5}"#,
        ),
        ("x-slo-ttft-ms", "250"),
    ];
    let lookup = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let r = fc.request_from_headers(7, 42, lookup);
    assert_eq!(r.priority, 7);
    assert_eq!(r.bytes, 42);
    assert_eq!(r.fairness_id.as_deref(), Some("tenant-a"));
    assert_eq!(
        (&*r.workload.workload_id, r.workload.criticality),
        ("fraud-detection", 5)
    );
    assert_eq!(r.slo_ttft, Some(Duration::from_millis(250)));
    let none = fc.request_from_headers(0, 0, |_| None);
    assert_eq!(none.fairness_id, None);
    assert_eq!(
        (&*none.workload.workload_id, none.workload.criticality),
        ("default", 3)
    );
    assert_eq!(none.slo_ttft, None);
}

#[tokio::test(start_paused = true)]
async fn shared_metrics_survive_a_controller_rebuild() {
    let metrics = FlowMetrics::new(100);
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let encode = |registry: &Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    };
    let sat = Arc::new(ManualSaturation::default());
    let old =
        FlowController::with_metrics(FlowControlConfig::default(), sat.clone(), metrics.clone());
    drop(old.admit(req(0, "f", wl("w", 3))).await.unwrap());
    // A new config: the picker builds a new controller on the same series.
    sat.set(1.0);
    let new =
        FlowController::with_metrics(FlowControlConfig::default(), sat.clone(), metrics.clone());
    drop(old);
    let fc = new.clone();
    let waiting = tokio::spawn(async move { fc.admit(req(0, "g", wl("w", 3))).await.map(drop) });
    until(|| new.queued() == 1).await;
    let text = encode(&registry);
    assert!(
        text.contains(r#"flow_control_requests_total{outcome="Dispatched",priority="0"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"flow_control_queue_size{fairness_id="g",priority="0"} 1"#),
        "{text}"
    );
    sat.set(0.0);
    new.capacity_changed();
    waiting.await.unwrap().unwrap();
    assert!(
        encode(&registry)
            .contains(r#"flow_control_requests_total{outcome="Dispatched",priority="0"} 2"#)
    );
}
