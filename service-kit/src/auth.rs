//! Service-to-service authentication: mount [`require_signed`] on every route
//! that only the other service may call (`POST /shipments`, the
//! shipment-events callback, the event feeds). Public routes stay open.
//!
//! ```text
//! .route("/orders/feed", get(feed).route_layer(require_signed(&state.verifier)))
//! ```
//!
//! `route_layer` (not `layer`) so that a wrong method still gets the router's
//! 405 rather than a 401. The verifier answers before any handler or
//! database work: 401 problem+json with `WWW-Authenticate` when the request
//! is unsigned, mis-signed, stale or replayed; 413 when its body is over the
//! service's `MAX_BODY_BYTES`. The scheme is described in
//! [`resilience::signing`]; the settings are in
//! [`DeliveryArgs`](crate::config::DeliveryArgs) (`SERVICE_SECRET`,
//! `SERVICE_SECRETS`, `SIGNATURE_WINDOW`).

pub use resilience::signing::{Signer, Verifier, VerifySignatureLayer};

/// The layer that lets only signed requests through. Clones of one
/// [`Verifier`] share its replay cache: build one per process (with
/// [`DeliveryArgs::verifier`](crate::config::DeliveryArgs::verifier)) and
/// pass it to every route that needs it.
pub fn require_signed(verifier: &Verifier) -> VerifySignatureLayer {
    VerifySignatureLayer::new(verifier.clone())
}
