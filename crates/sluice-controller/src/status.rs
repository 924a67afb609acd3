//! Status conditions and Events, written by the Lease holder only.
