//! sluice-sim
