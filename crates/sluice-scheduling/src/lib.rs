//! sluice-scheduling
