//! The plugin registry: plugin type name ⇒ factory.
//!
//! Registration is an explicit call (no link-time discovery), so a binary's plugin set is
//! visible in one place: [`Registry::with_builtins`] plus whatever other crates add with
//! [`Registry::register`].

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;

use crate::cycle::{Clock, SystemClock};
use crate::plugin::{Plugin, TypedName};

/// What a factory receives.
#[derive(Debug)]
pub struct PluginInit<'a> {
    /// The plugin's type and instance name.
    pub typed_name: TypedName,
    /// The `parameters` object from the config (`Null` when absent).
    pub parameters: &'a serde_json::Value,
    /// Shared services: the clock.
    pub env: &'a PluginEnv,
}

impl PluginInit<'_> {
    /// Decodes the parameters into `T`. Absent parameters give `T::default()`, so `T`'s
    /// `Default` must carry upstream's defaults. The error names the offending field and what
    /// was expected (serde's message), ready to be wrapped with the plugin's name.
    pub fn parse<T: DeserializeOwned + Default>(&self) -> Result<T, String> {
        match self.parameters {
            serde_json::Value::Null => Ok(T::default()),
            v => serde_json::from_value(v.clone()).map_err(|e| e.to_string()),
        }
    }
}

/// Services available to every plugin factory.
#[derive(Clone, Debug)]
pub struct PluginEnv {
    /// Where plugins read the time outside a scheduling cycle (for example to expire state).
    pub clock: Arc<dyn Clock>,
    /// State that outlives one scheduler (see [`SharedState`]).
    pub shared: SharedState,
}

impl Default for PluginEnv {
    fn default() -> Self {
        PluginEnv {
            clock: Arc::new(SystemClock),
            shared: SharedState::default(),
        }
    }
}

/// State plugins keep across scheduler rebuilds: the picker builds a new
/// [`Scheduler`](crate::Scheduler) for every config it applies, and passing the same
/// `SharedState` in [`SchedulerOptions`](crate::SchedulerOptions) lets the new prefix-cache
/// plugin (or an SLO plugin's running-request queues) keep what the old one learned.
///
/// Keys are chosen by the plugin, conventionally `<type>/<instance name>`.
#[derive(Clone, Default)]
pub struct SharedState {
    inner: Arc<Mutex<HashMap<String, Arc<dyn Any + Send + Sync>>>>,
}

impl fmt::Debug for SharedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.inner.lock().keys()).finish()
    }
}

impl SharedState {
    /// The value under `key`, created with `make` when absent (or when the value there has
    /// another type, which is then replaced).
    pub fn get_or_insert_with<T: Any + Send + Sync>(
        &self,
        key: &str,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        let mut m = self.inner.lock();
        if let Some(v) = m.get(key)
            && let Ok(t) = v.clone().downcast::<T>()
        {
            return t;
        }
        let v = Arc::new(make());
        m.insert(key.to_owned(), v.clone());
        v
    }

    /// Drops the value under `key`.
    pub fn remove(&self, key: &str) {
        self.inner.lock().remove(key);
    }
}

/// Builds one plugin instance; the error says what is wrong with the parameters.
pub type Factory = Arc<dyn Fn(&PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> + Send + Sync>;

/// Why a registration failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("plugin type {0:?} is already registered; use Registry::replace to override it")]
pub struct DuplicateType(pub String);

/// Plugin type name ⇒ factory.
#[derive(Clone, Default)]
pub struct Registry {
    factories: BTreeMap<String, Factory>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.factories.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// A registry with every built-in plugin type (see [`crate::plugins`]).
    pub fn with_builtins() -> Self {
        let mut r = Registry::new();
        crate::plugins::register_builtins(&mut r);
        r
    }

    /// Registers a factory for a new type. Registering a type twice is an error (upstream
    /// panics), because two crates silently fighting over one type name is a bug.
    pub fn register<F>(&mut self, type_name: &str, factory: F) -> Result<(), DuplicateType>
    where
        F: Fn(&PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> + Send + Sync + 'static,
    {
        if self.factories.contains_key(type_name) {
            return Err(DuplicateType(type_name.to_owned()));
        }
        self.factories
            .insert(type_name.to_owned(), Arc::new(factory));
        Ok(())
    }

    /// Registers or overrides a type: how the picker swaps the inert placeholders for the
    /// plugins it implements itself (parsers, data sources).
    pub fn replace<F>(&mut self, type_name: &str, factory: F)
    where
        F: Fn(&PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> + Send + Sync + 'static,
    {
        self.factories
            .insert(type_name.to_owned(), Arc::new(factory));
    }

    /// The factory for a type.
    pub fn get(&self, type_name: &str) -> Option<&Factory> {
        self.factories.get(type_name)
    }

    /// Whether a type is registered.
    pub fn contains(&self, type_name: &str) -> bool {
        self.factories.contains_key(type_name)
    }

    /// Every registered type, sorted.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }
}
