//! Retry-related errors.
//!
//! The retry layer returns the last attempt's own error (boxed) unchanged,
//! so callers downcast to the original type (`CircuitOpen`, `ClientError`,
//! `tower::timeout::error::Elapsed`, `InjectedFault`). This module only
//! re-exports them for convenience.

pub use crate::circuit_breaker::CircuitOpen;
#[cfg(feature = "client")]
pub use crate::client::ClientError;
#[cfg(feature = "fault")]
pub use crate::fault::InjectedFault;
