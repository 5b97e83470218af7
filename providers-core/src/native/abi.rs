//! The FFI-safe types that cross the native plugin boundary, checked by abi_stable at load.
//!
//! Everything here is data or a vtable: JSON travels as strings, errors as code + detail.
//! Adding a method at the end of a `#[sabi(last_prefix_field)]` table is compatible; any
//! other change is a new contract major version.
#![allow(
    missing_docs,
    reason = "abi_stable's derives generate public items (vtables, `_TO` objects) without docs"
)]
#![allow(
    unsafe_code,
    reason = "abi_stable's StableAbi derive and sabi_trait expand to unsafe impls; no hand-written unsafe here"
)]
#![allow(
    non_local_definitions,
    unused_qualifications,
    clippy::allow_attributes_without_reason,
    reason = "inside abi_stable's generated code"
)]

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, ROption, RResult, RStr, RString, RVec};
use abi_stable::{StableAbi, declare_root_module_statics, package_version_strings, sabi_trait};

/// An error crossing the boundary: the wire name of an [`ErrorCode`](crate::ErrorCode) and a detail.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiError {
    pub code: RString,
    pub detail: RString,
}

/// What a library says of its own build, read before any other call into it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct BuildFacts {
    /// The provider contract this library's `providers-core` speaks.
    pub contract: RString,
    /// The `providers-core` version it was built with.
    pub core: RString,
    /// The abi_stable version it was built with.
    pub abi_stable: RString,
    /// `rustc --version` of its compiler.
    pub rustc: RString,
    /// Its target triple.
    pub target: RString,
    /// Whether it unwinds on panic; a `panic = "abort"` library would take the host down.
    pub panic_unwind: bool,
}

/// A stored value, as JSON text, and its ETag.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiEntry {
    pub value: RString,
    pub etag: RString,
}

/// [`Expect`](crate::Expect) across the boundary: 0 any, 1 the ETag in `etag`, 2 absent.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiExpect {
    pub kind: u8,
    pub etag: RString,
}

/// An instance's status: the state's wire name (`ready`, `degraded`, `failed`) and a detail.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiStatus {
    pub state: RString,
    pub detail: RString,
}

/// The host's capabilities for one instance: its log and its `(tenant, service)` store.
#[sabi_trait]
pub trait FfiHost: Send + Sync {
    fn log(&self, level: u8, request_id: RStr<'_>, message: RStr<'_>);
    fn store_get(&self, key: RStr<'_>) -> RResult<ROption<FfiEntry>, FfiError>;
    fn store_set(
        &self,
        key: RStr<'_>,
        value: RStr<'_>,
        expect: FfiExpect,
    ) -> RResult<RString, FfiError>;
    fn store_delete(&self, key: RStr<'_>, etag: ROption<RString>) -> RResult<bool, FfiError>;
    /// A page as JSON: `{"items": [{"key", "value", "etag"}], "next": string | null}`.
    #[sabi(last_prefix_field)]
    fn store_list(
        &self,
        prefix: RStr<'_>,
        after: RStr<'_>,
        limit: u32,
    ) -> RResult<RString, FfiError>;
}

/// Calls another provider as the caller of one `execute`; refused once that call returned.
#[sabi_trait]
pub trait FfiCaller: Send + Sync {
    #[sabi(last_prefix_field)]
    fn call(
        &self,
        service: RStr<'_>,
        action: RStr<'_>,
        payload: RStr<'_>,
    ) -> RResult<RString, FfiError>;
}

/// One call's context. The identity is for the provider to read; nested calls go through
/// `caller`, which the host bound to the real caller, so changing these fields changes nothing.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiCall {
    pub tenant: RString,
    pub subject: RString,
    pub roles: RVec<RString>,
    pub request_id: RString,
    /// Milliseconds left before the deadline; `u64::MAX` for none.
    pub remaining_ms: u64,
    pub caller: FfiCaller_TO<'static, RBox<()>>,
}

/// One provider instance inside the library.
#[sabi_trait]
pub trait FfiInstance: Send + Sync {
    fn connect(
        &mut self,
        tenant: RStr<'_>,
        service: RStr<'_>,
        config: RStr<'_>,
        host: FfiHost_TO<'static, RBox<()>>,
    ) -> RResult<(), FfiError>;
    fn execute(
        &self,
        action: RStr<'_>,
        payload: RStr<'_>,
        call: FfiCall,
    ) -> RResult<RString, FfiError>;
    fn status(&self) -> FfiStatus;
    #[sabi(last_prefix_field)]
    fn disconnect(&self) -> RResult<(), FfiError>;
}

/// The library's root module: its build facts, its descriptor, and a way to make instances.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    pub facts: extern "C" fn() -> BuildFacts,
    /// The [`Descriptor`](crate::Descriptor) as JSON.
    pub describe: extern "C" fn() -> RResult<RString, FfiError>,
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn() -> RResult<FfiInstance_TO<'static, RBox<()>>, FfiError>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "erp_provider";
    const NAME: &'static str = "erp_provider";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
