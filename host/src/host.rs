//! The host: checked config, storage, token verification and tenant instances, composed.
//!
//! What a request runs against is one [`Generation`]: the configuration, its token verifier,
//! its OpenAPI document and the operators' controls, swapped whole on reload. A request takes
//! the current generation once and keeps it, and so do the nested calls it makes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use providers_core::{CallContext, Caller, ErrorCode, ProviderError, Resources, async_trait};
use providers_security::{Identity, TokenIssuer, TokenVerifier};
use serde_json::Value;
use tracing::Instrument;

use crate::config::{Config, TenantPlan, TenantService};
use crate::guard;
use crate::instances::{Instances, Settings};
use crate::storage::Storage;

mod admin;
pub mod reload;

pub use admin::{Admin, AdminScope};
pub use reload::{ConfigSource, Origin, ReloadReport};

/// One running host. Cheap to share: handlers and nested calls hold an `Arc`.
pub struct Host {
    me: Weak<Host>,
    current: ArcSwap<Generation>,
    storage: Storage,
    instances: Arc<Instances>,
    readiness: tokio::sync::Mutex<Option<(Instant, Readiness)>>,
    /// Where the configuration comes from, for reloads; none for a host started from a value.
    source: Option<Arc<ConfigSource>>,
    /// One reload or control change at a time.
    changing: tokio::sync::Mutex<()>,
    /// Set when shutdown begins: `/ready` says 503 while requests are still served.
    draining: AtomicBool,
    generations: AtomicU64,
    audit: crate::audit::Audit,
    /// The token service, when `[auth] enabled`.
    tokens: Option<crate::auth::TokenService>,
    /// The workflow executor, when a service runs the builtin `workflows`.
    workflows: Option<crate::workflows::Running>,
}

/// The issuer of `config`'s signing key, if one can sign.
pub(crate) fn issuer_of(config: &Config) -> Option<Arc<TokenIssuer>> {
    TokenIssuer::new(&config.keys, config.token.clone())
        .ok()
        .map(Arc::new)
}

/// Everything a request runs against, swapped whole when the configuration or a control changes.
pub struct Generation {
    /// Counts configurations applied since start (1 is the first); controls do not count.
    pub number: u64,
    /// The configuration.
    pub config: Arc<Config>,
    verifier: Arc<TokenVerifier>,
    /// Signs the token service's access tokens with the first key that can sign, so the
    /// verifier accepts what this host issues; none when no key can sign.
    issuer: Option<Arc<TokenIssuer>>,
    /// Identifies the keys and token settings the verifier was built from.
    keys: [u8; 32],
    openapi: Arc<Value>,
    /// Pauses and disabled services, from the system database.
    pub controls: Arc<Controls>,
}

/// Operators' switches, kept in the system database so they survive restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controls {
    /// Paused services by tenant; tenant `*` means every tenant.
    pub paused: HashMap<String, HashSet<String>>,
    /// Services disabled for a tenant.
    pub disabled: HashMap<String, HashSet<String>>,
}

/// The stored name of a pause that applies to every tenant.
pub const ALL_TENANTS: &str = "*";

impl Controls {
    fn from_rows(rows: Vec<(String, String, String)>) -> Self {
        let mut c = Controls::default();
        for (tenant, service, control) in rows {
            let map = match control.as_str() {
                "paused" => &mut c.paused,
                "disabled" => &mut c.disabled,
                other => {
                    tracing::warn!(control = other, "unknown service control ignored");
                    continue;
                }
            };
            map.entry(tenant).or_default().insert(service);
        }
        c
    }

    /// Who paused `tenant`'s `service`: `Some(true)` for all tenants, `Some(false)` for this one.
    pub fn paused(&self, tenant: &str, service: &str) -> Option<bool> {
        if self.paused.is_empty() {
            return None;
        }
        let has = |t: &str| self.paused.get(t).is_some_and(|s| s.contains(service));
        if has(ALL_TENANTS) {
            Some(true)
        } else if has(tenant) {
            Some(false)
        } else {
            None
        }
    }

    /// Whether an operator disabled `tenant`'s `service`.
    pub fn disabled(&self, tenant: &str, service: &str) -> bool {
        !self.disabled.is_empty()
            && self
                .disabled
                .get(tenant)
                .is_some_and(|s| s.contains(service))
    }
}

impl Generation {
    /// The issuer of this generation's signing key, if one can sign.
    pub fn issuer(&self) -> Option<&TokenIssuer> {
        self.issuer.as_deref()
    }

    /// The public signing keys, as a JWK Set.
    pub fn jwks(&self) -> Value {
        self.verifier.jwks()
    }

    /// The tenant's plan, or `FORBIDDEN` if the verified tenant is not configured here.
    pub fn tenant(&self, tenant: &str) -> Result<&TenantPlan, ProviderError> {
        self.config.tenants.get(tenant).ok_or_else(|| {
            ProviderError::forbidden(format!("tenant {tenant:?} is not configured on this host"))
        })
    }

    /// `tenant`'s enabled services, less those an operator disabled.
    pub fn services_of<'a>(
        &'a self,
        tenant: &'a str,
        plan: &'a TenantPlan,
    ) -> impl Iterator<Item = (&'a String, &'a TenantService)> + 'a {
        plan.services
            .iter()
            .filter(move |(s, _)| !self.controls.disabled(tenant, s))
    }

    /// `tenant`'s `service`, if enabled and not disabled.
    pub fn service<'a>(
        &'a self,
        tenant: &str,
        plan: &'a TenantPlan,
        service: &str,
    ) -> Result<&'a TenantService, ProviderError> {
        plan.services
            .get(service)
            .filter(|_| !self.controls.disabled(tenant, service))
            .ok_or_else(|| {
                ProviderError::not_found(format!(
                    "no service '{service}' is available to tenant '{tenant}'"
                ))
            })
    }

    /// The OpenAPI document of its configured services.
    pub fn openapi(&self) -> &Arc<Value> {
        &self.openapi
    }

    /// Verifies an `Authorization` header value. The tenant comes from the token and nowhere else.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, ProviderError> {
        let header = authorization.ok_or_else(|| {
            ProviderError::new(
                ErrorCode::Unauthenticated,
                "missing Authorization: Bearer <token> header",
            )
        })?;
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let token = header
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
            .map(|_| &header[7..])
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorCode::Unauthenticated,
                    "Authorization header is not a Bearer token",
                )
            })?;
        self.verifier
            .verify(token.trim())
            .map_err(|e| ProviderError::new(ErrorCode::Unauthenticated, e.to_string()))
    }
}

/// Whether this replica should receive traffic, with reasons a public probe may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Ready to serve.
    pub ready: bool,
    /// Why not, in generic terms: no tenant names, no error text from providers or storage.
    pub reasons: Vec<String>,
    /// Services that are not required and cannot be served here (their plugin was refused or
    /// is missing): the replica serves everything else. Names only; the reasons are in the log
    /// and in each tenant's `GET /providers`.
    pub unavailable: Vec<String>,
}

impl Host {
    /// Opens storage (the system pool and the builtin providers' own pool), prepares the
    /// builtin providers' tables, and prepares everything else; connects no provider yet.
    /// This host cannot reload: it has no source to read a configuration from again.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Host>> {
        Self::start_with(config, None).await
    }

    /// [`Host::start`] with the source `config` was read from, so that it can reload.
    pub async fn start_with(
        config: Config,
        source: Option<ConfigSource>,
    ) -> anyhow::Result<Arc<Host>> {
        let storage = Storage::open(&config.storage).await?;
        // The process's metrics recorder, installed by the first host.
        providers_observability::metrics();
        let verifier = TokenVerifier::new(&config.keys, config.token.clone())?;
        let keys = reload::keys_fingerprint(&config);
        let controls = storage
            .controls()
            .await
            .map_err(|e| anyhow::anyhow!("reading the service controls: {e}"))?;
        let mut resources = Resources::default();
        resources.insert(storage.builtin_pool().clone());
        // Once here rather than on every instance's first connect.
        providers_database::prepare(storage.builtin_pool())
            .await
            .map_err(|e| anyhow::anyhow!("preparing the kv tables: {e}"))?;
        providers_logic::prepare(storage.builtin_pool())
            .await
            .map_err(|e| anyhow::anyhow!("preparing the uid tables: {e}"))?;
        let instances = Arc::new(Instances::new(
            storage.clone(),
            resources,
            settings_of(&config),
        ));
        // Started before the host exists: on SQLite a second host process is refused here,
        // before it opens its port.
        let runs_workflows = config.services.values().any(|p| {
            p.unavailable.is_none()
                && p.factory.kind() == providers_core::Kind::Builtin
                && p.factory.descriptor().service == "workflows"
        });
        let executor = if runs_workflows {
            Some(
                crate::workflows::Running::start(storage.builtin_pool().clone(), &config.workflows)
                    .await?,
            )
        } else {
            None
        };
        let poll = config.workflows.poll;
        let openapi = Arc::new(crate::http::openapi::document(&config));
        let audit = crate::audit::Audit::start(storage.pool().clone(), config.audit.clone());
        let tokens = if config.auth.enabled {
            Some(crate::auth::TokenService::new(config.auth.clone())?)
        } else {
            None
        };
        let generation = Generation {
            number: 1,
            issuer: issuer_of(&config),
            config: Arc::new(config),
            verifier: Arc::new(verifier),
            keys,
            openapi,
            controls: Arc::new(Controls::from_rows(controls)),
        };
        Ok(Arc::new_cyclic(|me: &Weak<Host>| Host {
            me: me.clone(),
            current: ArcSwap::from_pointee(generation),
            storage,
            instances,
            readiness: tokio::sync::Mutex::new(None),
            source: source.map(Arc::new),
            changing: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            generations: AtomicU64::new(1),
            audit,
            tokens,
            workflows: executor.map(|e| crate::workflows::Running::spawn(e, me.clone(), poll)),
        }))
    }

    /// What requests run against now.
    pub fn generation(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// The configuration it runs now.
    pub fn config(&self) -> Arc<Config> {
        self.current.load().config.clone()
    }

    /// The token service, when `[auth] enabled`.
    pub fn tokens(&self) -> Option<&crate::auth::TokenService> {
        self.tokens.as_ref()
    }

    /// The audit trail.
    pub fn audit(&self) -> &crate::audit::Audit {
        &self.audit
    }

    /// The system database.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The tenant instances.
    pub fn instances(&self) -> &Arc<Instances> {
        &self.instances
    }

    /// The OpenAPI document of the configured services.
    pub fn openapi(&self) -> Arc<Value> {
        self.current.load().openapi.clone()
    }

    /// Verifies an `Authorization` header value against the current generation.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, ProviderError> {
        self.current.load().authenticate(authorization)
    }

    /// A context for a client's call. [`Host::call`] gives it the means to call other
    /// providers, for the duration of that call only.
    pub fn context(&self, identity: Identity, request_id: &str) -> CallContext {
        CallContext::of(
            identity.tenant,
            identity.subject,
            identity.roles,
            identity.company_id,
            request_id,
        )
    }

    /// Runs `service`/`action` for the context's tenant on the current generation.
    pub async fn call(
        &self,
        ctx: CallContext,
        service: &str,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError> {
        let generation = self.generation();
        self.call_in(&generation, ctx, service, action, payload)
            .await
    }

    /// Runs `service`/`action` for the context's tenant: checks the service is enabled for it
    /// and not paused, the roles grant the permission and the payload fits the schema, then
    /// calls the tenant's instance under the deadline. Nested calls stay on `generation`.
    pub async fn call_in(
        &self,
        generation: &Arc<Generation>,
        ctx: CallContext,
        service: &str,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError> {
        let started = Instant::now();
        // Resolved once: the span and the metrics name only a configured service and a
        // declared action (what a client sent shows as "-").
        let plan = generation.config.services.get(service);
        let descriptor = plan.map(|p| p.factory.descriptor());
        let declared = descriptor.and_then(|d| d.actions.iter().position(|a| a.name == action));
        // Everything known before the call is given when the span opens: each field recorded
        // later is one more trip through every layer.
        let span = tracing::info_span!(
            target: "provider_host::call",
            "call",
            service = if plan.is_some() { service } else { "-" },
            action = if declared.is_some() { action } else { "-" },
            tenant = ctx.tenant(),
            depth = ctx.depth(),
            version = plan.zip(descriptor).map(|(p, d)| p.calls.version(d)),
            kind = plan.map(|p| crate::observe::kind_name(p.factory.kind())),
            outcome = tracing::field::Empty,
            error_code = tracing::field::Empty,
            duration_us = tracing::field::Empty,
        );
        let tenant = generation.config.metrics_tenant_index(ctx.tenant());
        let result = self
            .call_unmeasured(generation, ctx, service, action, payload)
            .instrument(span.clone())
            .await;
        let took = started.elapsed();
        let code = result.as_ref().err().map(|e| e.code);
        if !span.is_disabled() && providers_observability::traces_exported() {
            tracing::record_all!(
                span,
                outcome = crate::audit::outcome_of(code),
                error_code = code.map(|c| c.as_str()),
                duration_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            );
        }
        crate::observe::call(
            &generation.config,
            plan.map(|p| &**p),
            declared.map(|i| (i, action)),
            tenant,
            code,
            took,
        );
        result
    }

    async fn call_unmeasured(
        &self,
        generation: &Arc<Generation>,
        ctx: CallContext,
        service: &str,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError> {
        let config = &generation.config;
        let tenant = generation.tenant(ctx.tenant())?;
        let enabled = generation.service(ctx.tenant(), tenant, service)?;
        if let Some(reason) = &enabled.service.unavailable {
            return Err(ProviderError::unavailable(reason.clone()));
        }
        let descriptor = enabled.service.factory.descriptor();
        let Some(spec) = descriptor.find_action(action) else {
            return Err(ProviderError::not_found(format!(
                "service '{service}' has no action '{action}'"
            )));
        };
        if !config.permissions.allows(ctx.roles(), &spec.permission) {
            return Err(ProviderError::forbidden(format!(
                "action '{service}/{action}' needs permission '{}', which roles {:?} do not grant",
                spec.permission,
                ctx.roles()
            )));
        }
        // After the permission check: a caller who may not call the action learns nothing more.
        if let Some(all) = generation.controls.paused(ctx.tenant(), service) {
            let whom = if all {
                "for every tenant".to_owned()
            } else {
                format!("for tenant '{}'", ctx.tenant())
            };
            return Err(ProviderError::unavailable(format!(
                "service '{service}' is paused {whom} by an administrator; calls resume when it is resumed"
            )));
        }
        if let Some(validator) = enabled.service.validators.get(action)
            && let Err(e) = validator.validate(&payload)
        {
            let at = e.instance_path().as_str();
            let at = if at.is_empty() { "/" } else { at };
            return Err(ProviderError::validation(format!("payload at '{at}': {e}")));
        }
        // Which marked fields this caller may not see, decided before the context moves on.
        let hidden: Vec<&crate::masking::Mask> = match enabled.service.masks.get(action) {
            Some(masks) => masks
                .iter()
                .filter(|m| !config.permissions.allows(ctx.roles(), &m.permission))
                .collect(),
            None => Vec::new(),
        };
        // A nested call is a provider call of its own in the audit trail; the client's call
        // is recorded at the HTTP edge.
        let nested = (ctx.depth() > 0 && self.audit.enabled()).then(|| {
            (
                Instant::now(),
                ctx.tenant().to_owned(),
                ctx.subject().to_owned(),
                ctx.request_id().to_owned(),
                ctx.depth(),
                crate::audit::sha256_hex(payload.to_string().as_bytes()),
            )
        });
        let request_timeout = config.server.request_timeout;
        let timeout = enabled
            .limits
            .timeout
            .map_or(request_timeout, |t| t.min(request_timeout));
        let mut deadline = Instant::now() + timeout;
        if let Some(outer) = ctx.deadline() {
            deadline = deadline.min(outer);
        }
        // Nested calls go through a handle that closes when this call ends, however it ends:
        // a provider that keeps a copy of its context cannot call as this user afterwards.
        let scope = Arc::new(CallScope {
            host: self.me.clone(),
            generation: generation.clone(),
            open: AtomicBool::new(true),
        });
        let _close = CloseScope(scope.clone());
        let ctx = ctx.with_caller(scope).with_deadline(Some(deadline));
        // The block owns the context, so it reaches the provider without a copy.
        let work = async move {
            let (_lease, live) = self
                .instances
                .acquire(ctx.tenant(), service, enabled)
                .await?;
            let _permit = match &live.limiter {
                Some(limiter) => Some(limiter.clone().try_acquire_owned().map_err(|_| {
                    ProviderError::new(
                        ErrorCode::RateLimited,
                        format!(
                            "tenant '{}' has {} calls in flight on '{service}', its limit",
                            ctx.tenant(),
                            enabled.limits.max_concurrency.unwrap_or(0)
                        ),
                    )
                })?),
                None => None,
            };
            let result = live.provider.execute(action, payload, &ctx).await;
            live.count(&result);
            result
        };
        // One deadline covers connecting (on a first call) and executing.
        let result = guard::run(
            || format!("'{service}/{action}'"),
            deadline,
            self.instances.cancel(),
            work,
        )
        .await;
        if let Some((started, tenant, subject, request_id, depth, payload_sha256)) = nested {
            let code = result.as_ref().err().map(|e| e.code);
            self.audit
                .record(crate::audit::Record {
                    tenant,
                    kind: "call".into(),
                    subject,
                    service: service.to_owned(),
                    action: action.to_owned(),
                    outcome: crate::audit::outcome_of(code).into(),
                    error_code: code.map(|c| c.as_str().to_owned()).unwrap_or_default(),
                    request_id,
                    latency_us: i64::try_from(started.elapsed().as_micros()).unwrap_or(i64::MAX),
                    payload_sha256,
                    note: format!("nested call, depth {depth}"),
                    at_ms: 0,
                })
                .await;
        }
        let mut answer = result?;
        if !hidden.is_empty() {
            crate::masking::apply(&hidden, &mut answer);
        }
        Ok(answer)
    }

    /// Periodic upkeep: disconnects idle instances and prunes old instance events. Returns
    /// how many instances were disconnected.
    pub async fn maintain(&self) -> usize {
        let generation = self.generation();
        let config = &generation.config;
        // A call begun before a reload may have brought back a slot the reload removed.
        self.instances.retire_where(|tenant, service, revision| {
            reload::keeps(&generation, tenant, service, revision)
        });
        let evicted = self.instances.evict_idle(config.server.idle_timeout).await;
        for plan in config.tenants.values() {
            plan.rate.forget_idle_clients();
        }
        if let Some(tokens) = &self.tokens {
            tokens.forget_idle_clients();
        }
        let storage = &config.storage;
        match self
            .storage
            .prune_events(storage.events_retention, storage.events_max_rows)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "pruned instance events"),
            Err(e) => tracing::warn!(error = %e, "could not prune instance events"),
        }
        evicted
    }

    /// Whether this replica should receive traffic: it is not shutting down, storage answers
    /// within `server.ready_timeout`, and every required service is loaded. No tenant's
    /// configuration, backend or instance status enters into it (those show per tenant in
    /// `GET /providers`). The answer is reused for `server.ready_cache`, and concurrent probes
    /// share one computation.
    pub async fn readiness(&self) -> Readiness {
        if self.draining.load(Ordering::Acquire) {
            return Readiness {
                ready: false,
                reasons: vec!["shutting down".into()],
                unavailable: Vec::new(),
            };
        }
        let mut cached = self.readiness.lock().await;
        if let Some((at, readiness)) = cached.as_ref()
            && at.elapsed() < self.config().server.ready_cache
        {
            return readiness.clone();
        }
        let readiness = self.check_readiness().await;
        *cached = Some((Instant::now(), readiness.clone()));
        readiness
    }

    async fn check_readiness(&self) -> Readiness {
        if self.instances.cancel().fired() || self.instances.closing() {
            return Readiness {
                ready: false,
                reasons: vec!["shutting down".into()],
                unavailable: Vec::new(),
            };
        }
        let config = self.config();
        let deadline = Instant::now() + config.server.ready_timeout;
        let storage = async {
            match tokio::time::timeout_at(deadline.into(), self.storage.ping()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "readiness: storage unreachable");
                    Some("storage unreachable".to_owned())
                }
                Err(_) => {
                    tracing::warn!("readiness: storage did not answer in time");
                    Some("storage unreachable".to_owned())
                }
            }
        };
        // A required service counts only by whether it can be served at all here (its
        // provider loaded). One tenant's failed connect or failing status never takes the
        // replica out: a replica out of rotation gets no call that could clear it, and a
        // backend shared by every replica would take them all out at once.
        let required: Vec<String> = config
            .services
            .values()
            .filter(|s| s.required && s.unavailable.is_some())
            .map(|s| format!("required service '{}' is unavailable", s.service))
            .collect();
        let reasons: Vec<String> = storage.await.into_iter().chain(required).collect();
        let unavailable = config
            .services
            .values()
            .filter(|s| !s.required && s.unavailable.is_some())
            .map(|s| s.service.clone())
            .collect();
        Readiness {
            ready: reasons.is_empty(),
            reasons,
            unavailable,
        }
    }

    /// Marks the replica as leaving: `/ready` answers 503 from now on, requests are still served.
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Refuses new calls, lets in-flight ones finish until `deadline` (cancelling those that
    /// do not), disconnects every instance, then closes storage.
    pub async fn shutdown(&self, deadline: Instant) {
        // First: steps in flight still need their instances, and no new step should start.
        if let Some(workflows) = &self.workflows {
            workflows.stop(deadline).await;
        }
        self.instances.shutdown(deadline).await;
        // After the instances: calls finishing during their drain are recorded too. The trail
        // gets time of its own: a grace spent to its end must not cost the records.
        self.audit
            .close(deadline.max(Instant::now() + Duration::from_secs(10)))
            .await;
        self.storage.close().await;
    }

    /// Period of the upkeep sweep: a quarter of the idle timeout, between 1 s and 60 s.
    pub fn eviction_period(&self) -> Duration {
        (self.config().server.idle_timeout / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// How instances connect, from `[server]` and `[plugins]`.
fn settings_of(config: &Config) -> Settings {
    let server = &config.server;
    Settings {
        connect_timeout: server.request_timeout,
        backoff: server.connect_backoff,
        backoff_max: server.connect_backoff_max,
        http_max_body: config.plugins.http_max_response_bytes,
    }
}

/// The nested-call handle of one call; closed when the call ends.
struct CallScope {
    host: Weak<Host>,
    /// The generation of the call this scope belongs to: nested calls stay on it.
    generation: Arc<Generation>,
    open: AtomicBool,
}

struct CloseScope(Arc<CallScope>);

impl Drop for CloseScope {
    fn drop(&mut self) {
        self.0.open.store(false, Ordering::Release);
    }
}

/// Provider-to-provider calls go back through [`Host::call`], so they meet the same checks.
#[async_trait]
impl Caller for CallScope {
    async fn call(
        &self,
        ctx: &CallContext,
        service: &str,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError> {
        if !self.open.load(Ordering::Acquire) {
            return Err(ProviderError::forbidden(format!(
                "cannot call '{service}/{action}': the call this context was given to has ended"
            )));
        }
        let host = self
            .host
            .upgrade()
            .ok_or_else(|| ProviderError::unavailable("the host is shutting down"))?;
        host.call_in(&self.generation, ctx.nested()?, service, action, payload)
            .await
    }
}
