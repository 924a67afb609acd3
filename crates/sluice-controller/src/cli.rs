//! The binary's flags and `run`.
