//! SLO-aware (predicted-latency) plugins. Placeholder: the SLO work adds its plugins here and
//! registers them through [`crate::Registry`].
