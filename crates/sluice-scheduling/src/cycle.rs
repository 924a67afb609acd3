//! Per-request state shared between plugins, and the injected clock and randomness.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::SmallRng;

/// Where "now" comes from. Production uses [`SystemClock`]; tests use [`ManualClock`] so that
/// time-dependent behaviour is deterministic.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Instant>,
}

impl ManualClock {
    /// A clock frozen at the moment of creation.
    pub fn new() -> Arc<Self> {
        Arc::new(ManualClock {
            now: Mutex::new(Instant::now()),
        })
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock();
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.now.lock()
    }
}

/// Well-known cycle-state keys, with upstream's names where one exists.
pub mod keys {
    /// [`PrefixMatchInfo`](crate::plugins::prefix::PrefixMatchInfo), written by the prefix
    /// producer before scheduling.
    pub const PREFIX_CACHE_MATCH_INFO: &str = "PrefixCacheMatchInfo";
    /// The in-flight load, which the scheduler itself keeps (see
    /// [`InFlightCounters`](crate::InFlightCounters)); declared so producers can name it as a
    /// dependency.
    pub const IN_FLIGHT_LOAD: &str = "InFlightLoad";
}

/// Data plugins share during one request (upstream's `CycleState`): written by data producers
/// and scorers, read by later plugins and by the request's response hooks.
///
/// Keys are strings, as upstream's are, so that two instances of one plugin type can keep
/// separate entries (prefix the key with the instance name). The store is a small vector:
/// a request carries a handful of entries, for which a linear scan beats hashing.
#[derive(Default)]
pub struct CycleState {
    entries: Vec<(CycleKey, Box<dyn Any + Send + Sync>)>,
}

/// A [`CycleState`] key: a `&'static str` (the built-in keys, stored without allocating on
/// every request) or an owned/shared string (per-instance keys).
#[derive(Clone)]
pub struct CycleKey(KeyRepr);

#[derive(Clone)]
enum KeyRepr {
    Static(&'static str),
    Shared(Arc<str>),
}

impl CycleKey {
    /// The key text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            KeyRepr::Static(s) => s,
            KeyRepr::Shared(s) => s,
        }
    }
}

impl fmt::Debug for CycleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<&'static str> for CycleKey {
    fn from(s: &'static str) -> Self {
        CycleKey(KeyRepr::Static(s))
    }
}

impl From<Arc<str>> for CycleKey {
    fn from(s: Arc<str>) -> Self {
        CycleKey(KeyRepr::Shared(s))
    }
}

impl From<String> for CycleKey {
    fn from(s: String) -> Self {
        CycleKey(KeyRepr::Shared(s.into()))
    }
}

impl fmt::Debug for CycleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(k, _)| k))
            .finish()
    }
}

impl CycleState {
    /// An empty state.
    pub fn new() -> Self {
        CycleState::default()
    }

    /// Stores `value` under `key`, replacing any previous value.
    pub fn insert<T: Any + Send + Sync>(&mut self, key: impl Into<CycleKey>, value: T) {
        let key = key.into();
        if let Some(slot) = self
            .entries
            .iter_mut()
            .find(|(k, _)| k.as_str() == key.as_str())
        {
            slot.1 = Box::new(value);
        } else {
            self.entries.push((key, Box::new(value)));
        }
    }

    /// The value under `key`, if there is one of type `T`.
    pub fn get<T: Any>(&self, key: &str) -> Option<&T> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .and_then(|(_, v)| v.downcast_ref())
    }

    /// The value under `key` for modification, if there is one of type `T`.
    pub fn get_mut<T: Any>(&mut self, key: &str) -> Option<&mut T> {
        self.entries
            .iter_mut()
            .find(|(k, _)| k.as_str() == key)
            .and_then(|(_, v)| v.downcast_mut())
    }

    /// Removes and returns the value under `key`, if there is one of type `T`.
    pub fn remove<T: Any>(&mut self, key: &str) -> Option<T> {
        let pos = self
            .entries
            .iter()
            .position(|(k, v)| k.as_str() == key && v.is::<T>())?;
        let (_, v) = self.entries.swap_remove(pos);
        v.downcast().ok().map(|b| *b)
    }

    /// Whether there is a value under `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _)| k.as_str() == key)
    }
}

/// What every plugin call during a request receives besides the request and candidates: the
/// shared state, the request's random number generator and the time the cycle started.
#[derive(Debug)]
pub struct Cycle {
    /// Data shared between plugins for this request.
    pub state: CycleState,
    /// Randomness for tie-breaks and sampling, seeded per request so that runs are
    /// reproducible under a fixed scheduler seed.
    pub rng: SmallRng,
    /// When scheduling started.
    pub now: Instant,
}
