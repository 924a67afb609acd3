//! The saturation gate the dispatcher consults before releasing a queued request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Tells the flow controller how full the pool is. The picker implements it from pod
/// metrics; it must be cheap (it is read under the controller's lock, once per dispatch).
///
/// When saturation may have dropped for a reason the controller cannot see (a metrics
/// refresh, an endpoint added), call [`crate::FlowController::capacity_changed`]; the
/// controller also re-reads saturation every `recheck_interval` while requests wait.
pub trait SaturationSource: Send + Sync + std::fmt::Debug + 'static {
    /// Pool saturation: 0 = idle, 1 or more = full. `in_flight` is the number of requests
    /// this controller has dispatched whose [`crate::AdmissionGuard`] is still alive, so a
    /// detector can count requests that have not shown up in server metrics yet.
    fn saturation(&self, in_flight: u64) -> f64;

    /// Whether the pool has any endpoint at all (a request waiting while it has none ends
    /// with [`crate::Outcome::EvictedNoEndpoints`]).
    fn has_endpoints(&self) -> bool {
        true
    }
}

/// Saturation as the controller's own in-flight count over a fixed limit, like upstream's
/// `concurrency-detector` applied to the pool as a whole.
#[derive(Debug)]
pub struct ConcurrencyLimit {
    max_in_flight: u64,
}

impl ConcurrencyLimit {
    /// Saturated at `max_in_flight` dispatched requests (at least 1).
    pub fn new(max_in_flight: u64) -> Self {
        Self {
            max_in_flight: max_in_flight.max(1),
        }
    }
}

impl SaturationSource for ConcurrencyLimit {
    fn saturation(&self, in_flight: u64) -> f64 {
        in_flight as f64 / self.max_in_flight as f64
    }
}

/// A saturation value set from outside (tests, or a picker that computes saturation in its
/// metrics refresher and stores it here).
#[derive(Debug)]
pub struct ManualSaturation {
    bits: AtomicU64,
    has_endpoints: AtomicBool,
}

impl Default for ManualSaturation {
    fn default() -> Self {
        Self {
            bits: AtomicU64::new(0f64.to_bits()),
            has_endpoints: AtomicBool::new(true),
        }
    }
}

impl ManualSaturation {
    /// Sets the saturation returned from now on.
    pub fn set(&self, saturation: f64) {
        self.bits.store(saturation.to_bits(), Ordering::Release);
    }

    /// Sets whether the pool has endpoints.
    pub fn set_has_endpoints(&self, has: bool) {
        self.has_endpoints.store(has, Ordering::Release);
    }
}

impl SaturationSource for ManualSaturation {
    fn saturation(&self, _in_flight: u64) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Acquire))
    }

    fn has_endpoints(&self) -> bool {
        self.has_endpoints.load(Ordering::Acquire)
    }
}

type SaturationFn = dyn Fn(u64) -> f64 + Send + Sync;
type EndpointsFn = dyn Fn() -> bool + Send + Sync;

/// A saturation source from closures, so the picker can adapt its scheduler's detector
/// (`Scheduler::saturation(&candidates)`) without a new type.
pub struct FnSaturation {
    saturation: Box<SaturationFn>,
    has_endpoints: Box<EndpointsFn>,
}

impl FnSaturation {
    /// `saturation(in_flight)` and `has_endpoints()` are called under the controller's lock
    /// on every dispatch decision: keep them cheap and non-blocking.
    pub fn new(
        saturation: impl Fn(u64) -> f64 + Send + Sync + 'static,
        has_endpoints: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            saturation: Box::new(saturation),
            has_endpoints: Box::new(has_endpoints),
        }
    }
}

impl std::fmt::Debug for FnSaturation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnSaturation")
    }
}

impl SaturationSource for FnSaturation {
    fn saturation(&self, in_flight: u64) -> f64 {
        (self.saturation)(in_flight)
    }

    fn has_endpoints(&self) -> bool {
        (self.has_endpoints)()
    }
}
