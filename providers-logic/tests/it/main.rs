//! The logic providers: `uid` and `purchase-orders` against real SQLite and PostgreSQL
//! databases, `rules` on its own.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] functions fail loudly on purpose"
)]

mod purchase_orders;
mod rules;
mod uid;
