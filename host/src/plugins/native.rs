//! The native engine: loads an abi_stable `cdylib` (never unloaded), checks its build facts
//! and layout, and adapts its FFI tables to a `Factory` and `Provider`, running every call
//! into it on the host's bounded native pool under the call's deadline.
//!
//! This is the only host module that touches abi_stable, so the ABI crate could be swapped
//! here and in `providers_core::native` alone. It needs no `unsafe`: abi_stable's loader
//! leaks the library (unloading Rust dylibs is unsound with thread-locals) and checks the
//! layout of every type in the root module before the first call.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Instant;

use abi_stable::library::lib_header_from_path;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RBox, ROption, RResult, RStr, RString};
use providers_core::native::{
    BuildFacts, FfiCall, FfiCaller, FfiCaller_TO, FfiEntry, FfiError, FfiExpect, FfiHost,
    FfiHost_TO, FfiInstance_TO, PluginModuleRef,
};
use providers_core::{
    CallContext, ConnectContext, Descriptor, Expect, Factory, Kind, Level, Logger, Provider,
    ProviderError, Status, Store, async_trait, contract_compatible,
};
use serde_json::Value;
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::discovery::Candidate;

type Instance = FfiInstance_TO<'static, RBox<()>>;

/// Threads native calls may occupy: in total, and per provider version, so that a plugin
/// whose calls hang can hold only its own share.
#[derive(Debug, Clone)]
pub struct NativePool {
    global: Arc<Semaphore>,
    threads_total: usize,
    /// Calls past their deadline still running, across every native provider.
    overdue: Arc<AtomicUsize>,
    per_provider: usize,
    threads: super::threads::Threads,
}

impl NativePool {
    /// A pool of `threads` in all, at most `per_provider` for any one provider.
    pub fn new(threads: usize, per_provider: usize) -> Self {
        Self {
            global: Arc::new(Semaphore::new(threads)),
            threads_total: threads,
            overdue: Arc::new(AtomicUsize::new(0)),
            per_provider: per_provider.min(threads).max(1),
            threads: super::threads::Threads::default(),
        }
    }

    /// `(threads, busy, overdue)`: the pool's size, the threads running a call now, and the
    /// calls among them that ran past their deadline.
    pub fn figures(&self) -> (usize, usize, usize) {
        let busy = self
            .threads_total
            .saturating_sub(self.global.available_permits());
        (
            self.threads_total,
            busy,
            self.overdue.load(Ordering::Acquire),
        )
    }

    /// `(threads, per_provider)`, for telling whether a reload may keep this pool.
    pub fn settings(&self) -> (usize, usize) {
        (self.threads_total, self.per_provider)
    }
}

/// What the library says of itself, after the host's checks.
#[derive(Clone)]
pub struct Loaded {
    /// The build facts.
    pub facts: BuildFacts,
    /// The descriptor it gave.
    pub descriptor: Descriptor,
    module: PluginModuleRef,
}

/// Opens `file`, checks abi_stable's layout and the build facts, and reads the descriptor.
/// Runs no plugin code but the facts and `describe` entries.
pub fn open(file: &Path) -> Result<Loaded, String> {
    let header = lib_header_from_path(file).map_err(|e| format!("cannot load: {e}"))?;
    let module = header
        .init_root_module::<PluginModuleRef>()
        .map_err(|e| format!("not a provider library of this ABI: {e}"))?;
    let facts = (module.facts())();
    check_facts(&facts)?;
    let json = (module.describe())()
        .into_result()
        .map_err(|e| format!("describe failed: {}", ProviderError::from(e)))?;
    let descriptor: Descriptor = serde_json::from_str(&json)
        .map_err(|e| format!("describe returned an invalid descriptor: {e}"))?;
    Ok(Loaded {
        facts,
        descriptor,
        module,
    })
}

fn check_facts(facts: &BuildFacts) -> Result<(), String> {
    if !facts.panic_unwind {
        return Err(
            "built with panic = \"abort\": a panic in it would abort the whole host; rebuild it with panic = \"unwind\" (the default)".into(),
        );
    }
    let target = providers_core::native::TARGET;
    if facts.target.as_str() != target {
        return Err(format!(
            "built for target {}, this host is {target}",
            facts.target
        ));
    }
    if facts.abi_stable.as_str() != providers_core::native::ABI_STABLE_VERSION {
        return Err(format!(
            "built with abi_stable {}, this host uses {}",
            facts.abi_stable,
            providers_core::native::ABI_STABLE_VERSION
        ));
    }
    let contract = providers_core::semver::Version::parse(&facts.contract).map_err(|e| {
        format!(
            "build facts name an invalid contract '{}': {e}",
            facts.contract
        )
    })?;
    let host = providers_core::contract_version();
    if !contract_compatible(&contract, &host) {
        return Err(format!(
            "built for contract {contract}, which is not compatible with this host's contract {host} (caret rule)"
        ));
    }
    if facts.rustc.as_str() != providers_core::native::RUSTC {
        // abi_stable checks layouts, not compilers: a different rustc is fine, but worth knowing.
        tracing::debug!(plugin_rustc = %facts.rustc, host_rustc = providers_core::native::RUSTC, "native plugin built with another compiler");
    }
    Ok(())
}

/// Makes instances of one loaded native provider.
pub struct NativeFactory {
    loaded: Loaded,
    origin: String,
    shared: Arc<Shared>,
}

/// What every instance of one provider version shares.
struct Shared {
    module: PluginModuleRef,
    service: String,
    pool: NativePool,
    calls: Arc<Semaphore>,
    /// Calls past their deadline still running in plugin code, across instances.
    overdue: Arc<AtomicUsize>,
}

impl NativeFactory {
    /// A factory for the checked candidate, with its library opened.
    pub fn new(candidate: &Candidate, loaded: Loaded, pool: NativePool) -> Self {
        let shared = Arc::new(Shared {
            module: loaded.module,
            service: loaded.descriptor.service.clone(),
            calls: Arc::new(Semaphore::new(pool.per_provider)),
            pool,
            overdue: Arc::new(AtomicUsize::new(0)),
        });
        Self {
            origin: candidate.file.display().to_string(),
            loaded,
            shared,
        }
    }
}

impl Factory for NativeFactory {
    fn descriptor(&self) -> &Descriptor {
        &self.loaded.descriptor
    }
    fn kind(&self) -> Kind {
        Kind::Native
    }
    fn origin(&self) -> &str {
        &self.origin
    }
    /// No plugin code runs here: the library's instance is made on a pool thread at connect.
    fn create(&self) -> Result<Box<dyn Provider>, ProviderError> {
        Ok(Box::new(NativeProvider {
            descriptor: self.loaded.descriptor.clone(),
            shared: self.shared.clone(),
            instance: None,
            overdue: Arc::new(AtomicUsize::new(0)),
        }))
    }
}

/// Dropping the last handle on the library's instance runs plugin code (its `Drop`): on a
/// pool thread, like every other call into it, never on a runtime worker.
impl Drop for NativeProvider {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take() {
            self.shared.pool.threads.spawn(move || drop(instance));
        }
    }
}

struct NativeProvider {
    descriptor: Descriptor,
    shared: Arc<Shared>,
    instance: Option<Arc<Instance>>,
    /// This instance's calls past their deadline still running in plugin code.
    overdue: Arc<AtomicUsize>,
}

const RUNNING: u8 = 0;
const DONE: u8 = 1;
const ABANDONED: u8 = 2;

/// Counts a call as overdue when its future is dropped (deadline, client gone) while the
/// plugin still runs it; the pool thread uncounts it when the call finally returns. The
/// state moves RUNNING → ABANDONED (here) or RUNNING → DONE (the thread) exactly once.
struct Watch {
    state: Arc<AtomicU8>,
    /// The instance's count, the provider's and the pool's.
    counters: [Arc<AtomicUsize>; 3],
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Count first, then claim: a count is never taken back before it was made, so the
        // counters cannot dip below zero while the pool thread finishes concurrently.
        for c in &self.counters {
            c.fetch_add(1, Ordering::AcqRel);
        }
        let abandoned = self
            .state
            .compare_exchange(RUNNING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !abandoned {
            for c in &self.counters {
                c.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Called by the pool thread when the plugin returned.
fn finish(state: &AtomicU8, counters: &[Arc<AtomicUsize>; 3]) {
    if state.swap(DONE, Ordering::AcqRel) == ABANDONED {
        for c in counters {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl NativeProvider {
    /// Takes a thread of this provider's share and of the pool. When every thread of the
    /// share is held by an overdue call, the answer is immediate rather than a wait that can
    /// only time out.
    async fn permits(&self) -> Result<[OwnedSemaphorePermit; 2], ProviderError> {
        let shared = &self.shared;
        let closed = || ProviderError::unavailable("the native pool is closed");
        let local = match shared.calls.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let overdue = shared.overdue.load(Ordering::Acquire);
                if overdue >= shared.pool.per_provider {
                    return Err(ProviderError::unavailable(format!(
                        "all {} native threads of '{}' are held by calls that ran past their deadline",
                        shared.pool.per_provider, shared.service
                    )));
                }
                shared
                    .calls
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| closed())?
            }
        };
        let pool = &shared.pool;
        let global = match pool.global.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Several hung providers together can hold the whole pool: say so at once.
                if pool.overdue.load(Ordering::Acquire) >= pool.threads_total {
                    return Err(ProviderError::unavailable(format!(
                        "all {} native threads of this host are held by calls that ran past their deadline",
                        pool.threads_total
                    )));
                }
                pool.global
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| closed())?
            }
        };
        Ok([local, global])
    }

    /// Runs `work` on a pool thread; `Err` if the thread itself failed.
    async fn run<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ProviderError> {
        self.run_or_release(what, work, drop).await
    }

    /// [`run`](Self::run), with `release` given the result when nobody waits for it any
    /// more (the caller's deadline passed, or its client left): a connect that finishes late
    /// disconnects what it connected rather than leaking it.
    async fn run_or_release<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce() -> T + Send + 'static,
        release: impl FnOnce(T) + Send + 'static,
    ) -> Result<T, ProviderError> {
        let permits = self.permits().await?;
        let state = Arc::new(AtomicU8::new(RUNNING));
        let counters = [
            self.overdue.clone(),
            self.shared.overdue.clone(),
            self.shared.pool.overdue.clone(),
        ];
        let _watch = Watch {
            state: state.clone(),
            counters: counters.clone(),
        };
        let (send, receive) = tokio::sync::oneshot::channel();
        // The call's span follows it onto the pool thread: the plugin's log lines land in it.
        let span = tracing::Span::current();
        self.shared.pool.threads.spawn(move || {
            let _span = span.enter();
            let _permits = permits;
            // The plugin's glue catches its panics; this catches the bridge's own.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            finish(&state, &counters);
            if let Err(Ok(orphan)) = send.send(out) {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| release(orphan)));
            }
        });
        match receive.await {
            Ok(Ok(out)) => Ok(out),
            _ => Err(ProviderError::provider(format!(
                "{what} of '{}' failed in the host's native bridge",
                self.shared.service
            ))),
        }
    }

    fn instance(&self) -> Result<Arc<Instance>, ProviderError> {
        self.instance.clone().ok_or_else(|| {
            ProviderError::unavailable(format!("'{}' is not connected", self.shared.service))
        })
    }
}

fn ffi<T>(r: RResult<T, FfiError>) -> Result<T, ProviderError> {
    r.into_result().map_err(ProviderError::from)
}

#[async_trait]
impl Provider for NativeProvider {
    fn descriptor(&self) -> Descriptor {
        self.descriptor.clone()
    }

    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        let store = ctx
            .store()
            .cloned()
            .ok_or_else(|| ProviderError::internal("a native instance needs its store"))?;
        let host = FfiHost_TO::from_value(
            HostServices {
                store,
                log: ctx.log().clone(),
                handle: Handle::current(),
            },
            TD_Opaque,
        );
        let config = ctx.config().to_string();
        let (tenant, service) = (ctx.tenant().to_owned(), ctx.service().to_owned());
        let module = self.shared.module;
        let late = (self.shared.service.clone(), ctx.tenant().to_owned());
        let instance = self
            .run_or_release(
                "connect",
                move || -> Result<Instance, ProviderError> {
                    let mut instance = ffi((module.create())())?;
                    ffi(instance.connect(
                        RStr::from_str(&tenant),
                        RStr::from_str(&service),
                        RStr::from_str(&config),
                        host,
                    ))?;
                    Ok(instance)
                },
                move |connected| {
                    if let Ok(instance) = connected {
                        let (service, tenant) = late;
                        tracing::warn!(service, tenant, "a native connect finished after its deadline; disconnecting what it connected");
                        let _ = instance.disconnect();
                    }
                },
            )
            .await??;
        self.instance = Some(Arc::new(instance));
        Ok(())
    }

    async fn disconnect(&self) -> Result<(), ProviderError> {
        let instance = self.instance()?;
        self.run("disconnect", move || ffi(instance.disconnect()))
            .await?
    }

    async fn execute(
        &self,
        action: &str,
        payload: Value,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        let instance = self.instance()?;
        let deadline = ctx.deadline();
        let mut call = FfiCall {
            tenant: ctx.tenant().into(),
            subject: ctx.subject().into(),
            roles: ctx
                .roles()
                .iter()
                .map(|r| RString::from(r.as_str()))
                .collect(),
            request_id: ctx.request_id().into(),
            remaining_ms: u64::MAX,
            caller: FfiCaller_TO::from_value(
                NestedCalls {
                    ctx: ctx.clone(),
                    handle: Handle::current(),
                },
                TD_Opaque,
            ),
        };
        let action_name = action.to_owned();
        let action = action.to_owned();
        let out = self.run("execute", move || -> Result<Value, ProviderError> {
            // Measured here, once the call has a thread: time spent queued is not the plugin's.
            if let Some(d) = deadline {
                call.remaining_ms = d.saturating_duration_since(Instant::now()).as_millis() as u64;
            }
            let payload = payload.to_string();
            let out =
                ffi(instance.execute(RStr::from_str(&action), RStr::from_str(&payload), call))?;
            serde_json::from_str(&out).map_err(|e| {
                ProviderError::provider(format!(
                    "the plugin returned a result that is not JSON: {e}"
                ))
            })
        });
        match ctx.deadline() {
            // Its own deadline, so the answer names the native call; the guard's is the same instant.
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), out).await {
                Ok(result) => result?,
                Err(_) => Err(ProviderError::new(
                    providers_core::ErrorCode::Timeout,
                    format!(
                        "'{}/{action_name}' did not finish before its deadline; the plugin still runs it on a native thread",
                        self.shared.service,
                    ),
                )),
            },
            None => out.await?,
        }
    }

    async fn get_status(&self) -> Status {
        let overdue = self.overdue.load(Ordering::Acquire);
        if overdue > 0 {
            return Status::degraded(format!(
                "{overdue} call(s) ran past their deadline and still run in plugin code"
            ));
        }
        let Ok(instance) = self.instance() else {
            return Status::failed("not connected");
        };
        match self.run("get_status", move || instance.status()).await {
            Ok(s) => match s.state.as_str() {
                "ready" => Status::ready(),
                "degraded" => Status::degraded(s.detail.into_string()),
                _ => Status::failed(s.detail.into_string()),
            },
            Err(e) => Status::degraded(e.detail),
        }
    }
}

/// Runs a capability's future from a pool thread. abi_stable's generated entries abort on an
/// unwinding panic, and the runtime panics when asked to run anything after it shut down
/// (a hung call that outlived shutdown, then touched its store): that becomes an error.
fn block<T>(
    handle: &Handle,
    work: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle.block_on(work)))
        .unwrap_or_else(|_| Err(ProviderError::unavailable("the host is shutting down")))
}

/// The FFI face of the capabilities. Its methods run on pool threads, which may block on
/// the runtime (they are not its workers).
struct HostServices {
    store: Arc<dyn Store>,
    log: Logger,
    handle: Handle,
}

impl FfiHost for HostServices {
    fn log(&self, level: u8, request_id: RStr<'_>, message: RStr<'_>) {
        self.log
            .log_for(Level::from_u8(level), request_id.as_str(), message.as_str());
    }

    fn store_get(&self, key: RStr<'_>) -> RResult<ROption<FfiEntry>, FfiError> {
        let out = block(&self.handle, self.store.get_text(key.as_str()));
        match out {
            Ok(Some((value, etag))) => RResult::ROk(ROption::RSome(FfiEntry {
                value: value.into(),
                etag: etag.into(),
            })),
            Ok(None) => RResult::ROk(ROption::RNone),
            Err(e) => RResult::RErr(e.into()),
        }
    }

    fn store_set(
        &self,
        key: RStr<'_>,
        value: RStr<'_>,
        expect: FfiExpect,
    ) -> RResult<RString, FfiError> {
        let result = (|| {
            let expect = match expect.kind {
                0 => Expect::Any,
                1 => Expect::Etag(expect.etag.into_string()),
                2 => Expect::Absent,
                n => {
                    return Err(ProviderError::validation(format!(
                        "unknown store precondition {n}"
                    )));
                }
            };
            let value = value.as_str().to_owned();
            block(
                &self.handle,
                self.store.set_text(key.as_str(), value, expect),
            )
        })();
        result.map(RString::from).map_err(FfiError::from).into()
    }

    fn store_delete(&self, key: RStr<'_>, etag: ROption<RString>) -> RResult<bool, FfiError> {
        let etag = etag.into_option();
        block(
            &self.handle,
            self.store
                .delete(key.as_str(), etag.as_ref().map(|e| e.as_str())),
        )
        .map_err(FfiError::from)
        .into()
    }

    fn store_list(
        &self,
        prefix: RStr<'_>,
        after: RStr<'_>,
        limit: u32,
    ) -> RResult<RString, FfiError> {
        block(
            &self.handle,
            self.store.list(prefix.as_str(), after.as_str(), limit),
        )
        .map(|page| RString::from(page.to_json().to_string()))
        .map_err(FfiError::from)
        .into()
    }
}

/// Nested calls of one native `execute`, through the host-side context: its scoped caller
/// is closed when the call ends, so a plugin that keeps this handle cannot use it later.
struct NestedCalls {
    ctx: CallContext,
    handle: Handle,
}

impl FfiCaller for NestedCalls {
    fn call(
        &self,
        service: RStr<'_>,
        action: RStr<'_>,
        payload: RStr<'_>,
    ) -> RResult<RString, FfiError> {
        let result = (|| {
            let payload: Value = serde_json::from_str(payload.as_str()).map_err(|e| {
                ProviderError::validation(format!("nested call payload is not JSON: {e}"))
            })?;
            let out = block(
                &self.handle,
                self.ctx.call(service.as_str(), action.as_str(), payload),
            )?;
            Ok::<_, ProviderError>(RString::from(out.to_string()))
        })();
        result.map_err(FfiError::from).into()
    }
}
