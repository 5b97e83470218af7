//! The wasm engine: WebAssembly components run in wasmtime, sandboxed per tenant.
//!
//! One `Engine` per set of settings, with the pooling allocator and epoch interruption.
//! A component is compiled once and cached on disk (keyed by its hash and the engine's
//! compatibility hash), then pre-linked (`InstancePre`). Every `(tenant, service)` instance
//! owns a small pool of wasm instances, each in its own `Store` — so tenants share no
//! memory and a tenant's parallel calls do not wait for each other. A call runs on the
//! async worker that polls it (no thread hand-off); the epoch ticker makes the guest yield
//! every tick and stops it at the call's deadline. An instance that trapped, ran out of
//! time or was abandoned mid-call is dropped; the next call gets a fresh one.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use providers_core::{
    CallContext, ConnectContext, Descriptor, ErrorCode, Expect, Factory, Http, HttpRequest, Kind,
    Logger, Provider, ProviderError, SandboxLimits, Status, async_trait,
};
use serde_json::Value;
use tokio::sync::Semaphore;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig, ResourceLimiter,
    Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::discovery::Candidate;

mod bindings {
    wasmtime::component::bindgen!({
        world: "provider",
        path: "../providers-core/wit",
        imports: { default: async },
        exports: { default: async },
    });
}

use bindings::erp::provider::{
    http as whttp, log as wlog, providers as wproviders, store as wstore, types as wtypes,
};

/// How often the epoch advances: the granularity of deadlines and of the guest's yields to
/// the async runtime.
const TICK: Duration = Duration::from_millis(5);
/// Bytes of a guest's stderr kept to explain a trap (a Rust guest prints its panic there).
const STDERR_KEPT: usize = 4096;
/// Time `describe` may take at load.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `[plugins]` settings the wasm engine is built from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WasmSettings {
    /// Linear memory ceiling of one instance: the pool's slot size.
    pub memory: u64,
    /// Instances in the pool, across everything.
    pub instances: u32,
    /// Instances one tenant's provider may run at once.
    pub per_tenant: u32,
    /// The compile cache's folder.
    pub cache_dir: PathBuf,
    /// Largest outbound HTTP response body.
    pub http_max_body: u64,
    /// Whether calls are metered with fuel.
    pub fuel: bool,
}

/// A wasmtime engine and the linker every component of it shares.
pub struct WasmEngine {
    engine: Engine,
    linker: Linker<Guest>,
    settings: WasmSettings,
    /// Hash of everything a compiled artifact depends on: the cache key's second half.
    compat: String,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine")
            .field("settings", &self.settings)
            .finish()
    }
}

/// Engines live per settings and are shared: each reserves its pool's address space, so a
/// config loaded twice (check, then serve) does not reserve it twice.
static ENGINES: Mutex<Vec<(WasmSettings, Weak<WasmEngine>)>> = Mutex::new(Vec::new());

impl WasmEngine {
    /// The engine for `settings`, shared with any other live holder of the same settings.
    pub fn shared(settings: &WasmSettings) -> Result<Arc<Self>, String> {
        let mut engines = ENGINES.lock().unwrap_or_else(|p| p.into_inner());
        engines.retain(|(_, e)| e.strong_count() > 0);
        if let Some(engine) = engines
            .iter()
            .find(|(s, _)| s == settings)
            .and_then(|(_, e)| e.upgrade())
        {
            return Ok(engine);
        }
        let engine = Arc::new(Self::new(settings.clone())?);
        engines.push((settings.clone(), Arc::downgrade(&engine)));
        Ok(engine)
    }

    fn new(settings: WasmSettings) -> Result<Self, String> {
        let mut pool = PoolingAllocationConfig::default();
        let instances = settings.instances;
        // A Rust component has a handful of core instances and tables; one memory.
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(8))
            .total_memories(instances.saturating_mul(2))
            .total_tables(instances.saturating_mul(8))
            .total_stacks(instances)
            .max_memory_size(settings.memory as usize)
            .max_core_instances_per_component(32)
            .max_memories_per_component(4)
            .max_tables_per_component(16);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .consume_fuel(settings.fuel)
            .cranelift_opt_level(OptLevel::Speed)
            .wasm_component_model(true)
            // Slots as large as the memory limit, not 4 GiB each: 10,000 instances fit in
            // the address space. Explicit bounds checks cost nothing measurable here
            // (bench/wasm-results.md).
            .memory_reservation(settings.memory)
            .memory_reservation_for_growth(0)
            .max_wasm_stack(512 << 10)
            .async_stack_size(1 << 20)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine =
            Engine::new(&config).map_err(|e| format!("cannot start the wasm engine: {e}"))?;
        let mut linker = Linker::new(&engine);
        // All of WASI p2 is linked, so a guest's std finds what it imports, but a store's
        // WASI context grants nothing: no preopened folder, an empty environment, no
        // sockets, no name lookup; stdout goes nowhere and stderr to a small buffer. A component
        // importing anything beyond WASI and the contract fails to link and is refused.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| format!("cannot link WASI: {e}"))?;
        bindings::Provider::add_to_linker::<Guest, HasSelf<Guest>>(&mut linker, |g| g)
            .map_err(|e| format!("cannot link the host capabilities: {e}"))?;
        // SHA-256 rather than std's hasher, whose output may change between Rust releases.
        let mut hasher = cache::Sha256Hasher::default();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = format!("{:016x}", hasher.finish());
        // The ticker holds the engine weakly: it stops when the engine goes.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| format!("cannot start the epoch ticker: {e}"))?;
        Ok(Self {
            engine,
            linker,
            settings,
            compat,
        })
    }

    /// The compiled component of `file` (whose sha256 the manifest gave and the loader
    /// checked): from the cache when present, else compiled and cached.
    pub fn component(&self, file: &Path, sha256: &str) -> Result<(Component, Origin), String> {
        let cached = cache::path(&self.settings.cache_dir, sha256, &self.compat);
        if let Some(component) = cache::load(&self.engine, &cached) {
            return Ok((component, Origin::Cache));
        }
        let component = self.compile(file)?;
        if let Err(e) = cache::store(&cached, &component) {
            tracing::warn!(file = %file.display(), cache = %cached.display(), error = %e, "cannot cache the compiled component; it will be compiled again at the next start");
        }
        Ok((component, Origin::Compiled))
    }

    fn compile(&self, file: &Path) -> Result<Component, String> {
        let bytes = std::fs::read(file).map_err(|e| format!("cannot read: {e}"))?;
        Component::from_binary(&self.engine, &bytes)
            .map_err(|e| format!("not a valid component for this host: {e:#}"))
    }

    /// Compiles `file` without the cache; also names its imports.
    pub fn compile_uncached(&self, file: &Path) -> Result<(Component, Vec<String>), String> {
        let component = self.compile(file)?;
        let imports = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        Ok((component, imports))
    }

    /// [`prepare`](Self::prepare) from synchronous code (config loading), on a thread of its own.
    pub fn prepare_blocking(self: &Arc<Self>, component: &Component) -> Result<Prepared, String> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .map_err(|e| format!("cannot start a runtime to describe it: {e}"))?;
                    runtime.block_on(self.prepare(component))
                })
                .join()
                .unwrap_or_else(|_| Err("describing it panicked in the host".into()))
        })
    }

    /// Links `component` and reads its descriptor (one throwaway instance, no capabilities).
    pub async fn prepare(self: &Arc<Self>, component: &Component) -> Result<Prepared, String> {
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| format!("the component does not fit this host's contract: {e:#}"))?;
        let pre = bindings::ProviderPre::new(pre).map_err(|e| {
            format!("the component does not export the provider world of erp:provider@1: {e:#}")
        })?;
        let caps = Arc::new(Caps::none());
        let limits = SandboxLimits::default();
        let mut warm = instantiate(self, &pre, caps, limits, None)
            .await
            .map_err(|e| format!("cannot instantiate: {}", e.detail))?;
        warm.store.data_mut().deadline = Some(Instant::now() + DESCRIBE_TIMEOUT);
        let json = warm
            .bindings
            .call_describe(&mut warm.store)
            .await
            .map_err(|e| format!("describe failed: {}", trapped(&warm.store, &e).detail))?;
        let descriptor: Descriptor = serde_json::from_str(&json)
            .map_err(|e| format!("describe returned an invalid descriptor: {e}"))?;
        Ok(Prepared {
            pre,
            descriptor: descriptor.normalized(),
        })
    }
}

/// Where a component's machine code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The on-disk cache.
    Cache,
    /// Compiled now (and cached).
    Compiled,
}

/// A linked component and what it says of itself.
pub struct Prepared {
    pre: bindings::ProviderPre<Guest>,
    /// Its descriptor.
    pub descriptor: Descriptor,
}

mod cache {
    //! Compiled components on disk: `<sha256>-<engine hash>.cwasm`, written atomically into
    //! a folder only the host's user can enter, with a SHA-256 of the artifact beside it.

    use std::path::{Path, PathBuf};

    use sha2::{Digest, Sha256};
    use wasmtime::Engine;
    use wasmtime::component::Component;

    /// A `Hasher` over SHA-256, for wasmtime's engine compatibility hash.
    #[derive(Default)]
    pub struct Sha256Hasher(Sha256);

    impl std::hash::Hasher for Sha256Hasher {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            let digest = self.0.clone().finalize();
            u64::from_be_bytes(digest[..8].try_into().unwrap_or_default())
        }
    }

    pub fn path(dir: &Path, sha256: &str, compat: &str) -> PathBuf {
        dir.join(format!(
            "{}-{compat}.cwasm",
            sha256.trim().to_ascii_lowercase()
        ))
    }

    fn digest(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The cached component, if the artifact is whole and this engine accepts it.
    pub fn load(engine: &Engine, path: &Path) -> Option<Component> {
        let bytes = std::fs::read(path).ok()?;
        let expected = std::fs::read_to_string(path.with_extension("sha256")).ok()?;
        if digest(&bytes) != expected.trim() {
            tracing::warn!(cache = %path.display(), "a cached component does not match its digest; compiling again");
            return None;
        }
        deserialize(engine, &bytes)
            .inspect_err(|e| tracing::warn!(cache = %path.display(), error = %e, "a cached component was refused; compiling again"))
            .ok()
    }

    #[allow(
        unsafe_code,
        reason = "wasmtime's only way to load machine code it compiled earlier"
    )]
    fn deserialize(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Component> {
        // SAFETY: the bytes are an artifact this host wrote with `Component::serialize` into
        // its own 0700 cache folder, whole (their SHA-256 matches the digest written beside
        // them after the atomic rename); wasmtime checks the version and engine settings in
        // the header and refuses a mismatch. The folder is as trusted as the host binary.
        unsafe { Component::deserialize(engine, bytes) }
    }

    pub fn store(path: &Path, component: &Component) -> Result<(), String> {
        let dir = path.parent().ok_or("no cache folder")?;
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(|e| e.to_string())?;
        let bytes = component.serialize().map_err(|e| e.to_string())?;
        let tmp = path.with_extension(format!("tmp{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, &bytes).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, path).map_err(|e| e.to_string())?;
        std::fs::write(path.with_extension("sha256"), digest(&bytes)).map_err(|e| e.to_string())
    }
}

/// What a guest can reach: its store, its log and its outbound HTTP. `None` at load time,
/// when `describe` runs with no capability at all.
struct Caps {
    store: Option<Arc<dyn providers_core::Store>>,
    log: Logger,
    http: Option<Arc<dyn Http>>,
}

impl Caps {
    fn none() -> Self {
        Self {
            store: None,
            log: Logger::default(),
            http: None,
        }
    }
}

/// A store's data: WASI's (nearly empty) context, the capabilities, and the call in
/// progress, which is the only way the guest can reach `call-provider`.
struct Guest {
    wasi: WasiCtx,
    table: ResourceTable,
    stderr: MemoryOutputPipe,
    limiter: Limiter,
    caps: Arc<Caps>,
    /// The call in progress; `None` between calls, so a nested-call capability dies with it.
    call: Option<CallContext>,
    deadline: Option<Instant>,
}

impl WasiView for Guest {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Memory growth past the instance's limit fails (the guest sees `memory.grow` return -1)
/// and is remembered, so the trap that usually follows is explained.
struct Limiter {
    memory: usize,
    exceeded: bool,
    /// Linear memory this instance holds now, for its service's gauges.
    holds: usize,
    gauges: Option<Gauges>,
}

/// A service's `wasm_instances` and `wasm_memory_bytes`, moved by its instances as they are
/// made, grow and go (nothing to compute at scrape time).
#[derive(Clone)]
struct Gauges {
    instances: metrics::Gauge,
    memory: metrics::Gauge,
}

impl Gauges {
    fn of(service: &str) -> Self {
        Self {
            instances: metrics::gauge!("wasm_instances", "service" => service.to_owned()),
            memory: metrics::gauge!("wasm_memory_bytes", "service" => service.to_owned()),
        }
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        if let Some(g) = &self.gauges {
            g.instances.decrement(1.0);
            g.memory.decrement(self.holds as f64);
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.exceeded = true;
            return Ok(false);
        }
        if let Some(g) = &self.gauges {
            g.memory
                .increment(desired.saturating_sub(self.holds) as f64);
        }
        self.holds = desired;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// One wasm instance in its own store.
struct Warm {
    store: Store<Guest>,
    bindings: bindings::Provider,
}

async fn instantiate(
    engine: &WasmEngine,
    pre: &bindings::ProviderPre<Guest>,
    caps: Arc<Caps>,
    limits: SandboxLimits,
    gauges: Option<Gauges>,
) -> Result<Warm, ProviderError> {
    if let Some(g) = &gauges {
        g.instances.increment(1.0);
    }
    let stderr = MemoryOutputPipe::new(STDERR_KEPT);
    let wasi = WasiCtx::builder()
        .stderr(stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build();
    let memory = limits
        .memory_bytes
        .unwrap_or(engine.settings.memory)
        .min(engine.settings.memory) as usize;
    let mut store = Store::new(
        &engine.engine,
        Guest {
            wasi,
            table: ResourceTable::new(),
            stderr,
            limiter: Limiter {
                memory,
                exceeded: false,
                holds: 0,
                gauges,
            },
            caps,
            call: None,
            deadline: None,
        },
    );
    store.limiter(|g| &mut g.limiter);
    store.epoch_deadline_callback(|ctx| {
        if ctx.data().deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::Yield(1))
    });
    store.set_epoch_deadline(1);
    if engine.settings.fuel {
        store
            .set_fuel(limits.fuel.unwrap_or(u64::MAX))
            .map_err(|e| ProviderError::internal(format!("cannot set fuel: {e}")))?;
    }
    let bindings = pre.instantiate_async(&mut store).await.map_err(|e| {
        if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some()
        {
            ProviderError::unavailable(format!(
                "every wasm instance slot of this host is in use (plugins.wasm_instances = {})",
                engine.settings.instances
            ))
        } else {
            ProviderError::provider(format!("cannot instantiate the component: {e:#}"))
        }
    })?;
    Ok(Warm { store, bindings })
}

/// The error a trap (or any failure inside wasmtime) becomes, explained from what the store saw.
fn trapped(store: &Store<Guest>, e: &wasmtime::Error) -> ProviderError {
    let data = store.data();
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => {
            return ProviderError::new(
                ErrorCode::Timeout,
                "the component was stopped at its deadline",
            );
        }
        Some(Trap::OutOfFuel) => {
            return ProviderError::provider("the component ran out of fuel (limits.fuel)");
        }
        Some(Trap::StackOverflow) => {
            return ProviderError::provider(
                "the component overflowed its stack (unbounded recursion?) and was stopped",
            );
        }
        // A Rust or C guest keeps its stack in linear memory: overflowing it runs below
        // address 0, which wasm reports as an out-of-bounds access.
        Some(Trap::MemoryOutOfBounds) => {
            return ProviderError::provider(
                "the component accessed memory out of bounds (an overflow of its own stack, such as unbounded recursion, ends this way) and was stopped",
            );
        }
        _ => {}
    }
    if data.limiter.exceeded {
        return ProviderError::provider(format!(
            "the component exceeded its memory limit of {} bytes and was stopped",
            data.limiter.memory
        ));
    }
    let stderr = data.stderr.contents();
    let said = String::from_utf8_lossy(&stderr);
    // The last thing it said, skipping Rust's "note: run with RUST_BACKTRACE" line.
    let last = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.starts_with("note: "))
        .unwrap_or_default();
    let mut detail = format!("the component trapped: {}", e.root_cause());
    if !last.is_empty() {
        detail.push_str(&format!("; it said: {}", last.trim()));
    }
    ProviderError::provider(detail)
}

fn from_wit(e: wtypes::Error) -> ProviderError {
    use wtypes::ErrorCode as W;
    let code = match e.code {
        W::ValidationError => ErrorCode::ValidationError,
        W::Unauthenticated => ErrorCode::Unauthenticated,
        W::Forbidden => ErrorCode::Forbidden,
        W::NotFound => ErrorCode::NotFound,
        W::Conflict => ErrorCode::Conflict,
        W::RateLimited => ErrorCode::RateLimited,
        W::Timeout => ErrorCode::Timeout,
        W::ProviderUnavailable => ErrorCode::ProviderUnavailable,
        W::ProviderError => ErrorCode::ProviderError,
        W::Internal => ErrorCode::Internal,
    };
    ProviderError::new(code, e.message)
}

fn to_wit(e: ProviderError) -> wtypes::Error {
    use wtypes::ErrorCode as W;
    let code = match e.code {
        ErrorCode::ValidationError => W::ValidationError,
        ErrorCode::Unauthenticated => W::Unauthenticated,
        ErrorCode::Forbidden => W::Forbidden,
        ErrorCode::NotFound => W::NotFound,
        ErrorCode::Conflict => W::Conflict,
        ErrorCode::RateLimited => W::RateLimited,
        ErrorCode::Timeout => W::Timeout,
        ErrorCode::ProviderUnavailable => W::ProviderUnavailable,
        ErrorCode::ProviderError => W::ProviderError,
        _ => W::Internal,
    };
    wtypes::Error {
        code,
        message: e.detail,
    }
}

impl wtypes::Host for Guest {}

impl wlog::Host for Guest {
    async fn log(&mut self, level: wlog::Level, message: String) {
        let level = match level {
            wlog::Level::Debug => providers_core::Level::Debug,
            wlog::Level::Info => providers_core::Level::Info,
            wlog::Level::Warn => providers_core::Level::Warn,
            wlog::Level::Error => providers_core::Level::Error,
        };
        let request_id = self.call.as_ref().map(|c| c.request_id().to_owned());
        self.caps
            .log
            .log_for(level, request_id.as_deref().unwrap_or(""), &message);
    }
}

impl Guest {
    fn store(&self) -> Result<Arc<dyn providers_core::Store>, wtypes::Error> {
        self.caps.store.clone().ok_or_else(|| {
            to_wit(ProviderError::new(
                ErrorCode::Forbidden,
                "the store is not available while the component is being described",
            ))
        })
    }
}

impl wstore::Host for Guest {
    async fn get(&mut self, key: String) -> Result<Option<wstore::Entry>, wtypes::Error> {
        let store = self.store()?;
        let entry = store.get_text(&key).await.map_err(to_wit)?;
        Ok(entry.map(|(value, etag)| wstore::Entry { value, etag }))
    }

    async fn set(
        &mut self,
        key: String,
        value: String,
        expect: wstore::Expect,
    ) -> Result<String, wtypes::Error> {
        let store = self.store()?;
        let expect = match expect {
            wstore::Expect::Any => Expect::Any,
            wstore::Expect::Etag(etag) => Expect::Etag(etag),
            wstore::Expect::Absent => Expect::Absent,
        };
        store.set_text(&key, value, expect).await.map_err(to_wit)
    }

    async fn delete(&mut self, key: String, etag: Option<String>) -> Result<bool, wtypes::Error> {
        let store = self.store()?;
        store.delete(&key, etag.as_deref()).await.map_err(to_wit)
    }

    async fn list(
        &mut self,
        prefix: String,
        after: String,
        limit: u32,
    ) -> Result<String, wtypes::Error> {
        let store = self.store()?;
        let page = store.list(&prefix, &after, limit).await.map_err(to_wit)?;
        Ok(page.to_json().to_string())
    }
}

impl wproviders::Host for Guest {
    async fn call(
        &mut self,
        service: String,
        action: String,
        payload: String,
    ) -> Result<String, wtypes::Error> {
        let Some(ctx) = self.call.clone() else {
            return Err(to_wit(ProviderError::new(
                ErrorCode::Forbidden,
                "call-provider is only available during execute",
            )));
        };
        let payload: Value = serde_json::from_str(&payload).map_err(|e| {
            to_wit(ProviderError::validation(format!(
                "nested call payload is not JSON: {e}"
            )))
        })?;
        let out = ctx.call(&service, &action, payload).await.map_err(to_wit)?;
        Ok(out.to_string())
    }
}

impl whttp::Host for Guest {
    async fn send(&mut self, request: whttp::Request) -> Result<whttp::Response, wtypes::Error> {
        let Some(http) = self.caps.http.clone() else {
            return Err(to_wit(ProviderError::new(
                ErrorCode::Forbidden,
                "outbound HTTP is not available while the component is being described",
            )));
        };
        let response = http
            .send(HttpRequest {
                method: request.method,
                url: request.url,
                headers: request.headers,
                body: request.body,
                deadline: self.deadline,
            })
            .await
            .map_err(to_wit)?;
        Ok(whttp::Response {
            status: response.status,
            headers: response.headers,
            body: response.body,
        })
    }
}

/// Makes instances of one loaded component.
pub struct WasmFactory {
    descriptor: Descriptor,
    origin: String,
    shared: Arc<Shared>,
}

struct Shared {
    engine: Arc<WasmEngine>,
    pre: bindings::ProviderPre<Guest>,
    service: String,
}

impl WasmFactory {
    /// A factory for the checked candidate, its component linked.
    pub fn new(candidate: &Candidate, engine: Arc<WasmEngine>, prepared: Prepared) -> Self {
        Self {
            origin: candidate.file.display().to_string(),
            shared: Arc::new(Shared {
                engine,
                pre: prepared.pre,
                service: prepared.descriptor.service.clone(),
            }),
            descriptor: prepared.descriptor,
        }
    }
}

impl Factory for WasmFactory {
    fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }
    fn kind(&self) -> Kind {
        Kind::Wasm
    }
    fn origin(&self) -> &str {
        &self.origin
    }
    /// No guest code runs here: instances are made at connect, with the tenant's limits.
    fn create(&self) -> Result<Box<dyn Provider>, ProviderError> {
        Ok(Box::new(WasmProvider {
            descriptor: self.descriptor.clone(),
            shared: self.shared.clone(),
            tenant: None,
        }))
    }
}

/// A `(tenant, service)` instance: the tenant's pool of wasm instances.
struct WasmProvider {
    descriptor: Descriptor,
    shared: Arc<Shared>,
    tenant: Option<Arc<TenantPool>>,
}

struct TenantPool {
    tenant: String,
    service: String,
    config: String,
    caps: Arc<Caps>,
    limits: SandboxLimits,
    idle: Mutex<Vec<Warm>>,
    /// Instances in use or idle; a call past the cap waits for one.
    slots: Arc<Semaphore>,
    gauges: Gauges,
}

impl TenantPool {
    fn take_idle(&self) -> Option<Warm> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_back(&self, warm: Warm) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(warm);
    }
}

impl WasmProvider {
    fn pool(&self) -> Result<&Arc<TenantPool>, ProviderError> {
        self.tenant.as_ref().ok_or_else(|| {
            ProviderError::unavailable(format!("'{}' is not connected", self.shared.service))
        })
    }

    /// A fresh instance of the tenant's pool, connected with the tenant's config.
    async fn fresh(
        &self,
        pool: &TenantPool,
        deadline: Option<Instant>,
    ) -> Result<Warm, ProviderError> {
        let mut warm = instantiate(
            &self.shared.engine,
            &self.shared.pre,
            pool.caps.clone(),
            pool.limits,
            Some(pool.gauges.clone()),
        )
        .await?;
        warm.store.data_mut().deadline = deadline;
        let connected = warm
            .bindings
            .call_connect(&mut warm.store, &pool.tenant, &pool.service, &pool.config)
            .await;
        warm.store.data_mut().deadline = None;
        match connected {
            Ok(Ok(())) => Ok(warm),
            Ok(Err(e)) => Err(from_wit(e)),
            Err(e) => Err(trapped(&warm.store, &e)),
        }
    }
}

#[async_trait]
impl Provider for WasmProvider {
    fn descriptor(&self) -> Descriptor {
        self.descriptor.clone()
    }

    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        let settings = &self.shared.engine.settings;
        let pool = Arc::new(TenantPool {
            tenant: ctx.tenant().to_owned(),
            service: ctx.service().to_owned(),
            config: ctx.config().to_string(),
            caps: Arc::new(Caps {
                store: ctx.store().cloned(),
                log: ctx.log().clone(),
                http: ctx.http().cloned(),
            }),
            limits: ctx.limits(),
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(settings.per_tenant.max(1) as usize)),
            gauges: Gauges::of(ctx.service()),
        });
        // The first instance is made now, so a config the guest refuses fails the connect.
        let warm = self.fresh(&pool, None).await?;
        pool.put_back(warm);
        self.tenant = Some(pool);
        Ok(())
    }

    async fn disconnect(&self) -> Result<(), ProviderError> {
        let pool = self.pool()?;
        pool.slots.close();
        let idle: Vec<Warm> =
            std::mem::take(&mut *pool.idle.lock().unwrap_or_else(|p| p.into_inner()));
        let mut first_error = None;
        for mut warm in idle {
            warm.store.data_mut().deadline = Some(Instant::now() + DESCRIBE_TIMEOUT);
            let outcome = match warm.bindings.call_disconnect(&mut warm.store).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(from_wit(e)),
                Err(e) => Err(trapped(&warm.store, &e)),
            };
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn execute(
        &self,
        action: &str,
        payload: Value,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        let pool = self.pool()?;
        let _slot = pool.slots.clone().acquire_owned().await.map_err(|_| {
            ProviderError::unavailable(format!("'{}' is disconnecting", self.shared.service))
        })?;
        let mut warm = match pool.take_idle() {
            Some(warm) => warm,
            None => self.fresh(pool, ctx.deadline()).await?,
        };
        let call = wtypes::Call {
            tenant: ctx.tenant().to_owned(),
            subject: ctx.subject().to_owned(),
            roles: ctx.roles().to_vec(),
            request_id: ctx.request_id().to_owned(),
            remaining_ms: ctx
                .deadline()
                .map(|d| d.saturating_duration_since(Instant::now()).as_millis() as u64),
        };
        let payload = payload.to_string();
        {
            let data = warm.store.data_mut();
            data.call = Some(ctx.clone());
            data.deadline = ctx.deadline();
        }
        if self.shared.engine.settings.fuel {
            warm.store
                .set_fuel(pool.limits.fuel.unwrap_or(u64::MAX))
                .map_err(|e| ProviderError::internal(format!("cannot set fuel: {e}")))?;
        }
        // If this future is dropped here (deadline, client gone), `warm` goes with it: an
        // instance abandoned mid-call is never reused.
        let out = warm
            .bindings
            .call_execute(&mut warm.store, action, &payload, &call)
            .await;
        {
            let data = warm.store.data_mut();
            data.call = None;
            data.deadline = None;
        }
        match out {
            Ok(Ok(text)) => {
                pool.put_back(warm);
                serde_json::from_str(&text).map_err(|e| {
                    ProviderError::provider(format!(
                        "the component returned a result that is not JSON: {e}"
                    ))
                })
            }
            Ok(Err(e)) => {
                pool.put_back(warm);
                Err(from_wit(e))
            }
            Err(e) => {
                let error = trapped(&warm.store, &e);
                tracing::warn!(service = %pool.service, tenant = %pool.tenant, error = %error.detail, "a wasm instance failed; the next call gets a fresh one");
                Err(error)
            }
        }
    }

    async fn get_status(&self) -> Status {
        let Ok(pool) = self.pool() else {
            return Status::failed("not connected");
        };
        let Ok(_slot) = pool.slots.clone().try_acquire_owned() else {
            return Status::ready();
        };
        let Some(mut warm) = pool.take_idle() else {
            return Status::ready();
        };
        warm.store.data_mut().deadline = Some(Instant::now() + DESCRIBE_TIMEOUT);
        let out = warm.bindings.call_get_status(&mut warm.store).await;
        warm.store.data_mut().deadline = None;
        match out {
            Ok(status) => {
                pool.put_back(warm);
                match status.state {
                    wtypes::State::Ready => Status::ready(),
                    wtypes::State::Degraded => Status::degraded(status.detail),
                    wtypes::State::Failed => Status::failed(status.detail),
                }
            }
            Err(e) => Status::degraded(trapped(&warm.store, &e).detail),
        }
    }
}

/// The floor the engine is benchmarked against: wasmtime alone, with this engine and linker,
/// instantiating a component and calling `execute` once, with none of the host's pool,
/// limits bookkeeping or error mapping. Not part of the host's API.
#[doc(hidden)]
pub mod reference {
    use super::*;

    /// Instantiates `prepared` in a fresh store of `engine` and runs `connect` then one
    /// `execute`; returns the result text.
    pub async fn instantiate_and_call(
        engine: &WasmEngine,
        prepared: &Prepared,
        config: &str,
        action: &str,
        payload: &str,
    ) -> String {
        let mut warm = instantiate(
            engine,
            &prepared.pre,
            Arc::new(Caps::none()),
            SandboxLimits::default(),
            None,
        )
        .await
        .map_err(|e| e.detail)
        .expect("instantiates");
        let _ = warm
            .bindings
            .call_connect(
                &mut warm.store,
                "bench",
                &prepared.descriptor.service,
                config,
            )
            .await
            .expect("connects");
        let call = wtypes::Call {
            tenant: "bench".into(),
            subject: "bench".into(),
            roles: Vec::new(),
            request_id: "r".into(),
            remaining_ms: None,
        };
        warm.bindings
            .call_execute(&mut warm.store, action, payload, &call)
            .await
            .expect("runs")
            .map_err(|e| e.message)
            .expect("succeeds")
    }
}
