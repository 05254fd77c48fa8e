//! # Layout
//!
//! Harness for rtinval's end-to-end tests against the real local stack (`scripts/stack up`):
//! MariaDB with binlog on, the tansu broker, Redis and memcached, all over loopback.
//!
//! Guarantees for tests built on it:
//! - **Isolation.** Each test gets its own database (`rtt_<test>_<unique>`), topic prefix and
//!   consumer group ([`unique`]), so tests run in parallel and rerun cleanly on a dirty stack.
//! - **Real processes.** The binaries under test run as child processes ([`Proc`]); their logs
//!   are printed when a test fails.
//! - **One source of truth.** Connection settings come from `scripts/stack env` (environment
//!   variables of the same names override).
//!
//! One module per thing the tests drive, all re-exported here: [`stack`] (settings, names,
//! binaries), [`database`], [`processes`], [`broker`], [`caches`], [`configs`]; plus
//! [`published`] (what a transaction published), [`proxy`] and [`registry`] (stand-ins).

pub mod broker;
pub mod caches;
pub mod configs;
pub mod database;
pub mod processes;
pub mod proxy;
pub mod published;
pub mod registry;
pub mod stack;

pub use broker::*;
pub use caches::*;
pub use configs::*;
pub use database::*;
pub use processes::*;
pub use stack::*;
