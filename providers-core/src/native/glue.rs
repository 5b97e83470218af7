//! The plugin side of the boundary: an ordinary `Provider` behind the FFI tables, with every
//! entry under `catch_unwind` and every future driven by a local executor.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RBox, ROption, RResult, RStr, RString};
use async_trait::async_trait;
use serde_json::Value;

use super::abi::{
    BuildFacts, FfiCall, FfiCaller_TO, FfiError, FfiExpect, FfiHost_TO, FfiInstance,
    FfiInstance_TO, FfiStatus, PluginModule, PluginModuleRef,
};
use crate::capabilities::{Expect, Level, Log, Logger, Store, StoreEntry, StorePage};
use crate::{CallContext, Caller, ConnectContext, Provider, ProviderError, State, Status};

/// Wakes the thread that is blocked in [`block_on`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `future` to completion on the current thread. The host calls plugins on threads of
/// its own, so blocking one here is what the boundary expects.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}

/// Runs `f`, turning a panic into `PROVIDER_ERROR` naming `what`, so no unwind reaches `extern "C"`.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, ProviderError>) -> RResult<T, FfiError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e.into()),
        Err(panic) => RResult::RErr(
            ProviderError::provider(format!(
                "{what} panicked in the plugin: {}",
                panic_text(&*panic)
            ))
            .into(),
        ),
    }
}

/// The build facts of the crate expanding [`export_native_provider!`](crate::export_native_provider).
pub fn facts_here(panic_unwind: bool) -> BuildFacts {
    BuildFacts {
        contract: crate::CONTRACT_VERSION.into(),
        core: super::CORE_VERSION.into(),
        abi_stable: super::ABI_STABLE_VERSION.into(),
        rustc: super::RUSTC.into(),
        target: super::TARGET.into(),
        panic_unwind,
    }
}

/// The descriptor of the provider `make` makes, as JSON.
pub fn describe_with<P: Provider>(make: fn() -> P) -> RResult<RString, FfiError> {
    guarded("describe", || {
        let descriptor = make().descriptor();
        serde_json::to_string(&descriptor)
            .map(RString::from)
            .map_err(|e| ProviderError::internal(format!("descriptor is not JSON: {e}")))
    })
}

/// A fresh instance of the provider `make` makes, behind the FFI table.
pub fn create_with<P: Provider>(
    make: fn() -> P,
) -> RResult<FfiInstance_TO<'static, RBox<()>>, FfiError> {
    guarded("create", || {
        Ok(FfiInstance_TO::from_value(
            Glue {
                provider: Some(make()),
            },
            TD_Opaque,
        ))
    })
}

/// The root module for the three entries the export macro defines.
pub fn module(
    facts: extern "C" fn() -> BuildFacts,
    describe: extern "C" fn() -> RResult<RString, FfiError>,
    create: extern "C" fn() -> RResult<FfiInstance_TO<'static, RBox<()>>, FfiError>,
) -> PluginModuleRef {
    PluginModule {
        facts,
        describe,
        create,
    }
    .leak_into_prefix()
}

/// The provider behind the table. Optional only so that `Drop` can take it out and drop it
/// under `catch_unwind`: abi_stable's generated destructor would abort on a panic.
struct Glue<P> {
    provider: Option<P>,
}

impl<P> Glue<P> {
    fn provider(&self) -> &P {
        self.provider
            .as_ref()
            .expect("the provider lives until the instance is dropped")
    }
}

impl<P> Drop for Glue<P> {
    fn drop(&mut self) {
        let provider = self.provider.take();
        let _ = catch_unwind(AssertUnwindSafe(move || drop(provider)));
    }
}

impl<P: Provider> FfiInstance for Glue<P> {
    fn connect(
        &mut self,
        tenant: RStr<'_>,
        service: RStr<'_>,
        config: RStr<'_>,
        host: FfiHost_TO<'static, RBox<()>>,
    ) -> RResult<(), FfiError> {
        guarded("connect", || {
            let config: Value = serde_json::from_str(config.as_str())
                .map_err(|e| ProviderError::validation(format!("config is not JSON: {e}")))?;
            let host = Arc::new(host);
            let ctx = ConnectContext::new(tenant.as_str(), config)
                .with_service(service.as_str())
                .with_store(Arc::new(HostStore(host.clone())))
                .with_log(Logger::new(Arc::new(HostLog(host))));
            let provider = self
                .provider
                .as_mut()
                .ok_or_else(|| ProviderError::internal("instance already dropped"))?;
            block_on(provider.connect(&ctx))
        })
    }

    fn execute(
        &self,
        action: RStr<'_>,
        payload: RStr<'_>,
        call: FfiCall,
    ) -> RResult<RString, FfiError> {
        guarded("execute", || {
            let payload: Value = serde_json::from_str(payload.as_str())
                .map_err(|e| ProviderError::validation(format!("payload is not JSON: {e}")))?;
            let deadline = (call.remaining_ms != u64::MAX)
                .then(|| Instant::now() + Duration::from_millis(call.remaining_ms));
            let roles: Vec<String> = call.roles.iter().map(|r| r.to_string()).collect();
            let ctx = CallContext::new(call.tenant.as_str(), call.request_id.as_str())
                .with_subject(call.subject.as_str())
                .with_roles(roles)
                .with_deadline(deadline)
                .with_caller(Arc::new(HostCaller(call.caller)));
            let out = block_on(self.provider().execute(action.as_str(), payload, &ctx))?;
            serde_json::to_string(&out)
                .map(RString::from)
                .map_err(|e| ProviderError::internal(format!("result is not JSON: {e}")))
        })
    }

    fn status(&self) -> FfiStatus {
        let status = catch_unwind(AssertUnwindSafe(|| block_on(self.provider().get_status())))
            .unwrap_or_else(|panic| {
                Status::failed(format!(
                    "get_status panicked in the plugin: {}",
                    panic_text(&*panic)
                ))
            });
        let state = match status.state {
            State::Ready => "ready",
            State::Degraded => "degraded",
            _ => "failed",
        };
        FfiStatus {
            state: state.into(),
            detail: status.detail.into(),
        }
    }

    fn disconnect(&self) -> RResult<(), FfiError> {
        guarded("disconnect", || block_on(self.provider().disconnect()))
    }
}

fn from_ffi<T>(r: RResult<T, FfiError>) -> Result<T, ProviderError> {
    r.into_result().map_err(ProviderError::from)
}

struct HostLog(Arc<FfiHost_TO<'static, RBox<()>>>);

impl Log for HostLog {
    fn log(&self, level: Level, request_id: &str, message: &str) {
        self.0.log(
            level.as_u8(),
            RStr::from_str(request_id),
            RStr::from_str(message),
        );
    }
}

struct HostStore(Arc<FfiHost_TO<'static, RBox<()>>>);

fn json(text: &str, what: &str) -> Result<Value, ProviderError> {
    serde_json::from_str(text).map_err(|e| {
        ProviderError::internal(format!("the host sent a {what} that is not JSON: {e}"))
    })
}

#[async_trait]
impl Store for HostStore {
    async fn get(&self, key: &str) -> Result<Option<StoreEntry>, ProviderError> {
        match from_ffi(self.0.store_get(RStr::from_str(key)))? {
            ROption::RSome(e) => Ok(Some(StoreEntry {
                value: json(&e.value, "value")?,
                etag: e.etag.into_string(),
            })),
            ROption::RNone => Ok(None),
        }
    }

    async fn set(&self, key: &str, value: Value, expect: Expect) -> Result<String, ProviderError> {
        let expect = match expect {
            Expect::Any => FfiExpect {
                kind: 0,
                etag: RString::new(),
            },
            Expect::Etag(e) => FfiExpect {
                kind: 1,
                etag: e.into(),
            },
            Expect::Absent => FfiExpect {
                kind: 2,
                etag: RString::new(),
            },
        };
        let value = value.to_string();
        from_ffi(
            self.0
                .store_set(RStr::from_str(key), RStr::from_str(&value), expect),
        )
        .map(RString::into_string)
    }

    async fn delete(&self, key: &str, etag: Option<&str>) -> Result<bool, ProviderError> {
        let etag = match etag {
            Some(e) => ROption::RSome(RString::from(e)),
            None => ROption::RNone,
        };
        from_ffi(self.0.store_delete(RStr::from_str(key), etag))
    }

    async fn list(
        &self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<StorePage, ProviderError> {
        let page = from_ffi(self.0.store_list(
            RStr::from_str(prefix),
            RStr::from_str(after),
            limit,
        ))?;
        StorePage::from_json(json(&page, "page")?)
    }
}

struct HostCaller(FfiCaller_TO<'static, RBox<()>>);

#[async_trait]
impl Caller for HostCaller {
    async fn call(
        &self,
        _ctx: &CallContext,
        service: &str,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError> {
        let payload = payload.to_string();
        let out = from_ffi(self.0.call(
            RStr::from_str(service),
            RStr::from_str(action),
            RStr::from_str(&payload),
        ))?;
        json(&out, "result")
    }
}
