//! The host end to end: configuration, routes, instances, storage on both backends, and the real binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] functions fail loudly on purpose"
)]

mod audit;
mod auth;
mod cli;
mod config;
mod deps;
mod instances;
mod isolation;
mod logic;
mod native;
mod observability;
mod operations;
mod plugins;
mod registry;
mod routes;
mod secrets;
mod security;
mod serving;
mod storage;
mod support;
mod wasm;
mod workflows;
