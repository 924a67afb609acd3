//! sluice-predictor
