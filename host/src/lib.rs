//! The ERP Provider Layer host: the one binary, `provider-host`.
//!
//! It owns the process: configuration, the registry of providers (builtins and plugins), the
//! tenant-scoped instances, storage, HTTP and the CLI. It is the only crate that starts a
//! tokio runtime or listens on a socket, and it depends on every other workspace crate.
//! Nothing depends on it; it is a library only so that its tests can drive it in-process.

pub mod audit;
pub mod auth;
pub mod config;
pub mod demo;
mod guard;
pub mod host;
pub mod http;
pub mod instances;
pub mod masking;
pub mod observe;
pub mod plugins;
pub mod rate;
pub mod secrets;
pub mod storage;
pub mod workflows;

use providers_core::{Registry, RegistryError};

// Builtin provider crates register through `inventory`; naming each here keeps the linker
// from dropping one whose items nothing else references.
use providers_database as _;
use providers_logic as _;
use providers_workflows as _;

pub use host::Host;

/// The registry of every provider compiled into this binary.
pub fn builtin_registry() -> Result<Registry, RegistryError> {
    // Touch a symbol of each builtin crate so its registrations are linked in.
    std::hint::black_box(providers_database::Kv::default as fn() -> providers_database::Kv);
    std::hint::black_box(providers_logic::Uid::default as fn() -> providers_logic::Uid);
    std::hint::black_box(
        providers_workflows::Workflows::default as fn() -> providers_workflows::Workflows,
    );
    Ok(Registry::builder().with_builtins()?.build())
}
