//! order-service: takes orders and gets them to shipping-service.
//!
//! # Layout
//!
//! - [`config`]: flags and environment variables.
//! - [`backlog`]: back-pressure: 503 while the outbox is past `MAX_PENDING`.
//! - [`domain`]: orders, their items and the status machine; parsing at the edge.
//! - [`store`]: the `orders` table.
//! - [`shipping`]: the outgoing call to shipping-service (push modes).
//! - [`pull`]: the orders feed it keeps and the shipments feed it reads (pull modes).
//! - [`routes`]: the HTTP API.
//! - [`startup`]: build, bind, run until a shutdown future resolves.
#![forbid(unsafe_code)]

pub mod backlog;
pub mod config;
pub mod domain;
pub mod pull;
pub mod routes;
pub mod shipping;
pub mod startup;
pub mod store;

pub use config::Config;
pub use startup::Application;
