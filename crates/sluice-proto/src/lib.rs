//! Generated Rust for sluice's own gRPC API, `sluice.config.v1` (controller -> picker config
//! distribution), and the conversions between its messages and `sluice-core` types.
//!
//! The code under `gen/` is produced by `cargo xtask codegen` from `proto/` and committed,
//! so building sluice needs no protoc; a test in xtask fails when it is stale.

#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms
)]
pub mod config {
    //! `sluice.config.v1`.
    pub mod v1 {
        include!("gen/sluice.config.v1.rs");
    }
}

mod convert;

pub use convert::SnapshotDecodeError;
