//! fake_apiserver (being written).
