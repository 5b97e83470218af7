//! The `kv` provider against real SQLite and PostgreSQL databases.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] functions fail loudly on purpose"
)]

mod kv;
mod limits;
mod memory;
mod storage;
mod support;
