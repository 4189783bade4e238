//! shipping-service: turns orders into shipments, ships them after a
//! warehouse delay, and reports back to order-service.
//!
//! # Layout
//!
//! - [`config`]: flags and environment variables.
//! - [`domain`]: shipments, their items and statuses; parsing at the edge.
//! - [`store`]: the `shipments` table.
//! - [`orders`]: the outgoing report to order-service (push modes).
//! - [`pull`]: the orders feed it reads and the shipments feed it keeps (pull modes).
//! - [`warehouse`]: the background task that ships due shipments and reports them.
//! - [`routes`]: the HTTP API.
//! - [`startup`]: build, bind, run until a shutdown future resolves.
#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod orders;
pub mod pull;
pub mod routes;
pub mod startup;
pub mod store;
pub mod warehouse;

pub use config::Config;
pub use startup::Application;
