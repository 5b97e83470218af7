//! The `Provider` trait and what `connect` and `get_status` exchange with the host.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::capabilities::{Logger, Store};
use crate::{CallContext, Descriptor, ProviderError};

/// A provider: one service behind the four calls of the contract.
///
/// # Lifecycle
///
/// For each `(tenant, service)` pair the host creates one instance and drives it in this order:
///
/// 1. [`connect`](Provider::connect) exactly once, with the tenant's configuration, before
///    anything else. If it fails the instance is dropped; after a backoff that grows with
///    each failure, a later call tries a fresh one.
/// 2. [`execute`](Provider::execute) any number of times, concurrently, each under its own
///    [`CallContext`] and deadline; [`get_status`](Provider::get_status) at any time.
/// 3. [`disconnect`](Provider::disconnect) exactly once, after the last in-flight `execute`
///    has returned: on idle eviction or at shutdown. Calls still running when the shutdown
///    grace ends are cancelled (dropped at their next await) before `disconnect` is called.
///
/// A [`CallContext`] is valid only during the call it was given to: a copy kept after
/// `execute` returned can no longer call other providers.
///
/// Payloads reaching `execute` have already been validated against the action's input
/// schema, and the caller holds the action's permission. A panic in any call is contained
/// by the host and reported as `PROVIDER_ERROR`; it never takes the host down.
///
/// # Example: the smallest provider
///
/// ```
/// use providers_core::{async_trait, CallContext, Descriptor, Action, Provider, ProviderError};
/// use serde_json::{json, Value};
///
/// struct Echo;
///
/// #[async_trait]
/// impl Provider for Echo {
///     fn descriptor(&self) -> Descriptor {
///         Descriptor::new("echo", semver::Version::new(1, 0, 0))
///             .action(Action::new("echo").permission("echo.call").idempotent())
///     }
///
///     async fn execute(&self, action: &str, payload: Value, _ctx: &CallContext) -> Result<Value, ProviderError> {
///         match action {
///             "echo" => Ok(payload),
///             other => Err(ProviderError::not_found(format!("no action '{other}'"))),
///         }
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let mut host = providers_core::testing::TestHost::new(Echo).await.unwrap();
/// assert_eq!(host.call("echo", json!({"hello": 1})).await.unwrap(), json!({"hello": 1}));
/// # });
/// ```
///
/// # Example: a configured provider
///
/// ```
/// use std::sync::OnceLock;
/// use providers_core::{async_trait, Action, CallContext, ConnectContext, Descriptor, Provider, ProviderError};
/// use serde_json::{json, Value};
///
/// #[derive(Default)]
/// struct Greeter { greeting: OnceLock<String> }
///
/// #[async_trait]
/// impl Provider for Greeter {
///     fn descriptor(&self) -> Descriptor {
///         Descriptor::new("greeter", semver::Version::new(1, 0, 0))
///             .config_schema(json!({
///                 "type": "object",
///                 "properties": {"greeting": {"type": "string"}},
///                 "required": ["greeting"],
///                 "additionalProperties": false
///             }))
///             .action(Action::new("greet")
///                 .permission("greeter.use")
///                 .input(json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})))
///     }
///
///     async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
///         let greeting = ctx.config()["greeting"].as_str()
///             .ok_or_else(|| ProviderError::validation("config.greeting: expected a string"))?;
///         self.greeting.get_or_init(|| greeting.to_owned());
///         Ok(())
///     }
///
///     async fn execute(&self, _action: &str, payload: Value, ctx: &CallContext) -> Result<Value, ProviderError> {
///         let greeting = self.greeting.get().map(String::as_str).unwrap_or("Hello");
///         Ok(json!({"text": format!("{greeting}, {} (tenant {})", payload["name"].as_str().unwrap_or("?"), ctx.tenant())}))
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let mut host = providers_core::testing::TestHost::builder(Greeter::default())
///     .tenant("acme")
///     .config(json!({"greeting": "Bonjour"}))
///     .connect().await.unwrap();
/// let out = host.call("greet", json!({"name": "Ada"})).await.unwrap();
/// assert_eq!(out["text"], "Bonjour, Ada (tenant acme)");
/// # });
/// ```
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Describes the provider. Must be cheap and return the same value every time.
    fn descriptor(&self) -> Descriptor;

    /// Brings the instance up with its tenant-specific configuration.
    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        let _ = ctx;
        Ok(())
    }

    /// Releases everything. Called once, after the last in-flight `execute` returned.
    async fn disconnect(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Runs one action. `payload` already satisfies the action's input schema.
    async fn execute(
        &self,
        action: &str,
        payload: Value,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError>;

    /// The instance's health.
    async fn get_status(&self) -> Status {
        Status::ready()
    }
}

/// The state part of [`Status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum State {
    /// Serving normally.
    Ready,
    /// Serving, with reduced capability.
    Degraded,
    /// Not serving.
    Failed,
}

/// What `get_status` reports: a state and a sentence for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The state.
    pub state: State,
    /// Why, for a human.
    pub detail: String,
}

impl Status {
    /// `ready`, with an empty detail.
    pub fn ready() -> Self {
        Self {
            state: State::Ready,
            detail: String::new(),
        }
    }

    /// `degraded`, with a reason.
    pub fn degraded(detail: impl Into<String>) -> Self {
        Self {
            state: State::Degraded,
            detail: detail.into(),
        }
    }

    /// `failed`, with a reason.
    pub fn failed(detail: impl Into<String>) -> Self {
        Self {
            state: State::Failed,
            detail: detail.into(),
        }
    }
}

/// What `connect` receives: the tenant, its configuration, and what the host lends the
/// instance: its shared resources (builtins) or its capabilities (plugins).
pub struct ConnectContext {
    tenant: String,
    service: String,
    config: Value,
    resources: Resources,
    store: Option<std::sync::Arc<dyn Store>>,
    log: Logger,
    http: Option<std::sync::Arc<dyn crate::Http>>,
    limits: crate::SandboxLimits,
}

impl ConnectContext {
    /// A context for `tenant` with `config` and no resources.
    pub fn new(tenant: impl Into<String>, config: Value) -> Self {
        Self {
            tenant: tenant.into(),
            service: String::new(),
            config,
            resources: Resources::default(),
            store: None,
            log: Logger::default(),
            http: None,
            limits: crate::SandboxLimits::default(),
        }
    }

    /// Sets the service name the instance is configured under.
    pub fn with_service(mut self, service: impl Into<String>) -> Self {
        self.service = service.into();
        self
    }

    /// The service name the operator configured this instance under; usually the
    /// descriptor's, but one provider may serve several services (`plugin = "..."`).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Adds the host's resources.
    pub fn with_resources(mut self, resources: Resources) -> Self {
        self.resources = resources;
        self
    }

    /// The tenant this instance serves, and only this one.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The provider's base config overlaid by the tenant's overrides; satisfies the config schema.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// A resource the host shares with trusted (builtin) providers, such as its database pool.
    pub fn resource<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.resources.get::<T>()
    }

    /// Gives the instance its `(tenant, service)` store.
    pub fn with_store(mut self, store: std::sync::Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// The instance's own key-value store, scoped to its tenant and service: what plugins
    /// keep their state in. The host gives one to every native and wasm instance.
    pub fn store(&self) -> Option<&std::sync::Arc<dyn Store>> {
        self.store.as_ref()
    }

    /// Gives the instance a log.
    pub fn with_log(mut self, log: Logger) -> Self {
        self.log = log;
        self
    }

    /// Where the instance's log lines go: the host's log, with provider and tenant fields.
    /// Keep a clone for later calls; it is cheap.
    pub fn log(&self) -> &Logger {
        &self.log
    }

    /// Gives the instance outbound HTTP.
    pub fn with_http(mut self, http: std::sync::Arc<dyn crate::Http>) -> Self {
        self.http = Some(http);
        self
    }

    /// Outbound HTTP restricted to the provider's `allowed_hosts`; plugins get it.
    pub fn http(&self) -> Option<&std::sync::Arc<dyn crate::Http>> {
        self.http.as_ref()
    }

    /// Sets the sandbox limits.
    pub fn with_limits(mut self, limits: crate::SandboxLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Memory and fuel limits of this tenant's instance, for engines that sandbox.
    pub fn limits(&self) -> crate::SandboxLimits {
        self.limits
    }
}

impl fmt::Debug for ConnectContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectContext")
            .field("tenant", &self.tenant)
            .field("service", &self.service)
            .field("config", &self.config)
            .field("resources", &self.resources.map.len())
            .field("store", &self.store.is_some())
            .finish()
    }
}

/// A type map of host resources handed to builtin providers at connect.
///
/// Only builtin providers share the host's Rust types, so only they get resources;
/// native and wasm providers receive an empty map.
#[derive(Default, Clone)]
pub struct Resources {
    map: HashMap<TypeId, std::sync::Arc<dyn Any + Send + Sync>>,
}

impl Resources {
    /// Adds (or replaces) the resource of type `T`.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.map
            .insert(TypeId::of::<T>(), std::sync::Arc::new(value));
    }

    /// The resource of type `T`, if the host provides one.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.map.get(&TypeId::of::<T>())?.downcast_ref::<T>()
    }
}
