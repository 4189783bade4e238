//! The lab: the same orders, under the same faults, through each delivery
//! mode, with what was lost and what was duplicated counted from the
//! databases.
//!
//! # Layout
//!
//! - [`cluster`]: both services as real OS processes (killable, restartable).
//! - [`faults`]: the fault profile applied to both services.
//! - [`audit`]: the invariants, counted from both databases, and what each
//!   mode promises about them.
//! - [`lab`]: the scenario: traffic, faults, outage, kills, settling.
//! - [`report`]: the table (and JSON) the lab prints.
//! - [`html`]: the report as one HTML file: the table and a timeline per mode.
//! - [`bench`]: `demo bench`, the end-to-end benchmark against the
//!   database's commit ceiling.

pub mod audit;
pub mod bench;
pub mod cluster;
pub mod faults;
pub mod html;
pub mod lab;
pub mod report;
