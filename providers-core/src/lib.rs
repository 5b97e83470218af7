//! The provider contract of the ERP Provider Layer.
//!
//! This crate is what a provider author depends on: the [`Provider`] trait with its four
//! calls, the [`Descriptor`] every provider gives of itself, the [`CallContext`] of a call,
//! the one error type [`ProviderError`] with its stable [`ErrorCode`]s, and the [`Registry`]
//! the host builds from factories of every kind (builtin, native, wasm).
//!
//! It stays light on purpose: no async runtime, no HTTP, no SQL, no wasm engine. It never
//! starts a runtime or a thread; the host owns those. Its only foreign types in the API are
//! `serde_json::Value` and `semver::Version`, and, behind the `native` feature, abi_stable's
//! FFI-safe types in `native` (what a native plugin exports with
//! `export_native_provider!`). Plugins get their state and log through
//! [`ConnectContext::store`] and [`ConnectContext::log`].

mod capabilities;
mod context;
mod descriptor;
mod error;
mod provider;
mod registry;
pub mod testing;

pub use async_trait::async_trait;
pub use capabilities::{
    Expect, Http, HttpRequest, HttpResponse, Level, Log, Logger, MemoryStore, SandboxLimits, Store,
    StoreEntry, StorePage,
};
pub use context::{CallContext, Caller, MAX_CALL_DEPTH};
pub use descriptor::{Action, Descriptor, is_valid_name, is_valid_permission};
pub use error::{ErrorCode, ProviderError};
pub use provider::{ConnectContext, Provider, Resources, State, Status};
pub use registry::{
    Builtin, Factory, FnFactory, Kind, Registry, RegistryBuilder, RegistryError,
    contract_compatible,
};
pub use semver;
pub use serde_json;

#[doc(hidden)]
pub use inventory;

#[cfg(feature = "native")]
pub mod native;

/// The contract version this crate defines. Providers record it in their descriptor;
/// the host refuses a provider whose contract is not caret-compatible with its own.
pub const CONTRACT_VERSION: &str = "1.0.0";

/// [`CONTRACT_VERSION`] parsed.
pub fn contract_version() -> semver::Version {
    semver::Version::new(1, 0, 0)
}

#[cfg(test)]
mod tests;
