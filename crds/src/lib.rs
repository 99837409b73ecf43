//! The `StreamProcessor` API (`sluice.io/v1alpha1`): the single source of
//! truth for the spec that the operator reconciles, the worker runs and the
//! chart installs.
//!
//! - [`spec`]: the types, with schema bounds and CEL rules the API server enforces;
//! - [`status`]: what the operator reports;
//! - [`validate`]: the same rules client-side (for local runs) plus what the
//!   API server cannot check (user expressions, generator templates);
//! - [`crd`]: the generated CustomResourceDefinition.

pub mod crd;
mod duration;
pub mod expr;
pub mod generator;
pub mod secrets;
pub mod spec;
pub mod status;
pub mod validate;

pub use duration::{DURATION_PATTERN, Duration, DurationError};
pub use spec::*;
pub use status::{StreamProcessorStatus, condition};
pub use validate::{FieldError, ValidationErrors};
