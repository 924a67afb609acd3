//! sluice-flowcontrol (being written).
