//! The Sluice operator: reconciles StreamProcessors into scaled worker
//! Deployments.

pub mod autoscale;
pub mod build;
pub mod controller;
pub mod hpa;
pub mod http;
pub mod metrics;
pub mod probe;
pub mod reconcile;
pub mod status;
