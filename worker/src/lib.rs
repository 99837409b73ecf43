//! The Sluice data plane.
