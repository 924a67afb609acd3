//! `sluice-sim`: a vLLM-compatible model-server simulator and an OpenAI load generator.
//!
//! - [`engine`]: a deterministic engine model (continuous batching, chunked prefill, paged KV
//!   cache with preemption, automatic prefix caching, LoRA slots) stepped in simulated time.
//! - [`server`]: the OpenAI-compatible HTTP server around one engine, with vLLM's `/metrics`,
//!   fault injection and an admin API; [`fleet`] runs many in one process.
//! - [`load`]: an open- and closed-loop load generator driven by YAML [`workload`]s.
//!
//! See `docs/simulator.md` at the repository root.

pub mod api;
pub mod bench;
pub mod engine;
pub mod fleet;
mod http1;
mod kv;
pub mod load;
pub mod metrics;
pub mod preset;
pub mod server;
pub mod tokenizer;
pub mod workload;

pub use engine::{Engine, EngineConfig};
pub use preset::Preset;
