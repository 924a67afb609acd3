//! sluice-picker
