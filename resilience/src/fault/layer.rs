//! Layer of the fault injector.

use tower::Layer;

use super::{Fault, FaultConfig, FaultHandle, InvalidFaultConfig};

/// Wraps services in [`Fault`]; all of them share one [`FaultHandle`].
#[derive(Debug, Clone)]
pub struct FaultLayer {
    handle: FaultHandle,
}

impl FaultLayer {
    /// A layer with `config` and an rng seeded with `seed`.
    pub fn new(config: FaultConfig, seed: u64) -> Result<Self, InvalidFaultConfig> {
        Ok(FaultLayer {
            handle: FaultHandle::new(config, seed)?,
        })
    }

    /// A layer driven by an existing handle.
    pub fn from_handle(handle: FaultHandle) -> Self {
        FaultLayer { handle }
    }

    /// The shared handle (adjust rates at run time).
    pub fn handle(&self) -> &FaultHandle {
        &self.handle
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Fault<S> {
        Fault::new(inner, self.handle.clone())
    }
}
