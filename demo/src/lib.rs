//! The lab: the same orders, under the same faults, through each delivery
//! mode, with what was lost and what was duplicated counted from the
//! databases.
//!
//! # Layout
//!
//! - [`cluster`]: both services as real OS processes (killable, restartable).
//! - [`audit`]: the invariants, counted from both databases.
//! - [`lab`]: the scenario: traffic, faults, outage, kills, settling.
//! - [`report`]: the table (and JSON) the lab prints.

pub mod audit;
pub mod cluster;
pub mod lab;
pub mod report;
