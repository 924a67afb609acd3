//! envoy (being written).
