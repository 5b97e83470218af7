//! The native plugin interface (feature `native`): how an ordinary `impl Provider` is
//! exported from a `cdylib` with [`export_native_provider!`](crate::export_native_provider),
//! and the FFI-safe types the host loads it through.
//!
//! The boundary is synchronous. The host calls each entry on a thread of its native pool
//! and never lends its async runtime: the glue here drives the provider's futures to
//! completion with a small executor of its own, so plugin code must not expect a tokio
//! reactor (a `tokio::time::sleep` in a plugin panics, and the panic is contained).
//! Every entry catches unwinding panics before they reach `extern "C"`, where they would
//! abort the process.

mod abi;
mod glue;

pub use abi::{
    BuildFacts, FfiCall, FfiCaller, FfiCaller_TO, FfiEntry, FfiError, FfiExpect, FfiHost,
    FfiHost_TO, FfiInstance, FfiInstance_TO, FfiStatus, PluginModule, PluginModuleRef,
};
pub use glue::{block_on, create_with, describe_with, facts_here, module};

/// abi_stable, for the export macro and the host's loader; plugin crates depend on the
/// same exact version (its `#[export_root_module]` names `::abi_stable`).
pub use abi_stable;

/// The compiler this `providers-core` was built with.
pub const RUSTC: &str = env!("PROVIDERS_CORE_RUSTC");
/// The target this `providers-core` was built for.
pub const TARGET: &str = env!("PROVIDERS_CORE_TARGET");
/// The `providers-core` version.
pub const CORE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The abi_stable version this crate pins.
pub const ABI_STABLE_VERSION: &str = "0.11.3";

use crate::{ErrorCode, ProviderError};

impl From<ProviderError> for FfiError {
    fn from(e: ProviderError) -> Self {
        FfiError {
            code: e.code.as_str().into(),
            detail: e.detail.into(),
        }
    }
}

impl From<FfiError> for ProviderError {
    fn from(e: FfiError) -> Self {
        let code = ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == e.code.as_str())
            .unwrap_or(ErrorCode::ProviderError);
        ProviderError::new(code, e.detail.into_string())
    }
}

/// Exports a provider from a `cdylib`: `export_native_provider!(MyProvider::default());`.
///
/// The expression makes one fresh, unconnected instance; it runs once to describe the
/// provider at load and once per `(tenant, service)` instance. The crate needs
/// `crate-type = ["cdylib"]`, `providers-core` with the `native` feature, and `abi_stable`
/// at the exact version `providers-core` pins (see `docs/native-plugins.md`).
#[macro_export]
macro_rules! export_native_provider {
    ($make:expr) => {
        // The module scopes abi_stable's generated `unsafe` (the exported loader static)
        // so that the plugin crate itself can keep `unsafe_code` denied.
        #[allow(unsafe_code, reason = "abi_stable's #[export_root_module] expansion")]
        #[doc(hidden)]
        mod __erp_native_export {
            #[allow(unused_imports, reason = "the expression may name items of the crate")]
            use super::*;

            fn make() -> impl $crate::Provider {
                $make
            }

            extern "C" fn facts() -> $crate::native::BuildFacts {
                $crate::native::facts_here(cfg!(panic = "unwind"))
            }

            extern "C" fn describe() -> $crate::native::abi_stable::std_types::RResult<
                $crate::native::abi_stable::std_types::RString,
                $crate::native::FfiError,
            > {
                $crate::native::describe_with(make)
            }

            extern "C" fn create() -> $crate::native::abi_stable::std_types::RResult<
                $crate::native::FfiInstance_TO<
                    'static,
                    $crate::native::abi_stable::std_types::RBox<()>,
                >,
                $crate::native::FfiError,
            > {
                $crate::native::create_with(make)
            }

            #[$crate::native::abi_stable::export_root_module]
            pub fn root_module() -> $crate::native::PluginModuleRef {
                $crate::native::module(facts, describe, create)
            }
        }
    };
}
