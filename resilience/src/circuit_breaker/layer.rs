//! Layer of the circuit breaker.

use tower::Layer;

use super::classify::HttpClassifier;
use super::config::CircuitBreakerConfig;
use super::handle::BreakerHandle;
use super::CircuitBreaker;

/// Wraps services in a [`CircuitBreaker`]. Every service this layer makes
/// shares one breaker (the layer's [`handle`](CircuitBreakerLayer::handle)).
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<K = HttpClassifier> {
    handle: BreakerHandle,
    classifier: K,
}

impl CircuitBreakerLayer<HttpClassifier> {
    /// A new breaker with the [`HttpClassifier`].
    pub fn new(config: CircuitBreakerConfig) -> Self {
        Self::from_handle(BreakerHandle::new(config))
    }

    /// Layers an existing breaker (e.g. one from a
    /// [`BreakerRegistry`](super::BreakerRegistry)).
    pub fn from_handle(handle: BreakerHandle) -> Self {
        CircuitBreakerLayer {
            handle,
            classifier: HttpClassifier,
        }
    }
}

impl<K> CircuitBreakerLayer<K> {
    /// Uses another classifier.
    pub fn with_classifier<K2>(self, classifier: K2) -> CircuitBreakerLayer<K2> {
        CircuitBreakerLayer {
            handle: self.handle,
            classifier,
        }
    }

    /// The shared breaker.
    pub fn handle(&self) -> &BreakerHandle {
        &self.handle
    }
}

impl<S, K: Clone> Layer<S> for CircuitBreakerLayer<K> {
    type Service = CircuitBreaker<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.handle.clone(), self.classifier.clone())
    }
}
