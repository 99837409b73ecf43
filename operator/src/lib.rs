//! The Sluice operator: reconciles StreamProcessors into scaled worker
//! Deployments.

pub mod autoscale;
pub mod build;
pub mod status;
