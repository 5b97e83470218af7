//! The host end to end: configuration, routes, instances, storage on both backends, and the real binary.

mod cli;
mod config;
mod instances;
mod registry;
mod routes;
mod storage;
mod support;
