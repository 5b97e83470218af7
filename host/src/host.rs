//! The host: checked config, storage, token verification and tenant instances, composed.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use providers_core::{CallContext, Caller, ErrorCode, ProviderError, Resources, async_trait};
use providers_security::{Identity, TokenVerifier};
use serde_json::Value;

use crate::config::{Config, TenantPlan};
use crate::guard;
use crate::instances::Instances;
use crate::storage::Storage;

/// One running host. Cheap to share: handlers and the nested-call handle hold an `Arc`.
pub struct Host {
    config: Config,
    storage: Storage,
    instances: Arc<Instances>,
    verifier: TokenVerifier,
    caller: Arc<dyn Caller>,
    openapi: Value,
}

impl Host {
    /// Opens storage and prepares everything; connects no provider yet.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Host>> {
        let storage = Storage::open(&config.storage.url, config.storage.max_connections).await?;
        let verifier = TokenVerifier::new(&config.keys, config.token.clone())?;
        let mut resources = Resources::default();
        resources.insert(storage.pool().clone());
        let instances = Arc::new(Instances::new(
            storage.clone(),
            resources,
            config.server.request_timeout,
        ));
        let openapi = crate::http::openapi::document(&config);
        Ok(Arc::new_cyclic(|me: &Weak<Host>| Host {
            config,
            storage,
            instances,
            verifier,
            caller: Arc::new(NestedCaller(me.clone())),
            openapi,
        }))
    }

    /// The configuration it runs.
    pub fn config(&self) -> &Config {
        &self.config
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
    pub fn openapi(&self) -> &Value {
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

    /// The tenant's plan, or `FORBIDDEN` if the verified tenant is not configured here.
    pub fn tenant(&self, tenant: &str) -> Result<&TenantPlan, ProviderError> {
        self.config.tenants.get(tenant).ok_or_else(|| {
            ProviderError::forbidden(format!("tenant '{tenant}' is not configured on this host"))
        })
    }

    /// A context for a client's call.
    pub fn context(&self, identity: Identity, request_id: &str) -> CallContext {
        CallContext::new(identity.tenant, request_id)
            .with_subject(identity.subject)
            .with_roles(identity.roles)
            .with_caller(self.caller.clone())
    }

    /// Runs `service`/`action` for the context's tenant: checks the service is enabled for it,
    /// the roles grant the permission and the payload fits the schema, then calls the tenant's
    /// instance under the deadline.
    pub async fn call(
        &self,
        ctx: CallContext,
        service: &str,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError> {
        let tenant = self.tenant(ctx.tenant())?;
        let Some(plan) = tenant.services.get(service) else {
            return Err(ProviderError::not_found(format!(
                "no service '{service}' is available to tenant '{}'",
                ctx.tenant()
            )));
        };
        let descriptor = plan.plan.factory.descriptor();
        let Some(spec) = descriptor.find_action(action) else {
            return Err(ProviderError::not_found(format!(
                "service '{service}' has no action '{action}'"
            )));
        };
        if !self
            .config
            .permissions
            .allows(ctx.roles(), &spec.permission)
        {
            return Err(ProviderError::forbidden(format!(
                "action '{service}/{action}' needs permission '{}', which roles [{}] do not grant",
                spec.permission,
                ctx.roles().join(", ")
            )));
        }
        if let Some(validator) = plan.plan.validators.get(action)
            && let Err(e) = validator.validate(&payload)
        {
            let at = e.instance_path().as_str();
            let at = if at.is_empty() { "/" } else { at };
            return Err(ProviderError::validation(format!("payload at '{at}': {e}")));
        }
        let timeout = plan
            .limits
            .timeout
            .map_or(self.config.server.request_timeout, |t| {
                t.min(self.config.server.request_timeout)
            });
        let mut deadline = Instant::now() + timeout;
        if let Some(outer) = ctx.deadline() {
            deadline = deadline.min(outer);
        }
        // The block owns the context, so the deadline is set on it without a copy.
        let work = async move {
            let (_lease, live) = self.instances.acquire(ctx.tenant(), service, plan).await?;
            let _permit = match &live.limiter {
                Some(limiter) => Some(limiter.clone().try_acquire_owned().map_err(|_| {
                    ProviderError::new(
                        ErrorCode::RateLimited,
                        format!(
                            "tenant '{}' has {} calls in flight on '{service}', its limit",
                            ctx.tenant(),
                            plan.limits.max_concurrency.unwrap_or(0)
                        ),
                    )
                })?),
                None => None,
            };
            let ctx = ctx.with_deadline(Some(deadline));
            live.provider.execute(action, payload, &ctx).await
        };
        // One deadline covers connecting (on a first call) and executing.
        guard::run(|| format!("'{service}/{action}'"), deadline, work).await
    }

    /// Disconnects idle instances; returns how many went.
    pub async fn evict_idle(&self) -> usize {
        self.instances
            .evict_idle(self.config.server.idle_timeout)
            .await
    }

    /// Refuses new calls, lets in-flight ones finish until `deadline`, disconnects every
    /// instance, then closes storage.
    pub async fn shutdown(&self, deadline: Instant) {
        self.instances.shutdown(deadline).await;
        self.storage.close().await;
    }

    /// Period of the idle-eviction sweep: a quarter of the idle timeout, between 1 s and 60 s.
    pub fn eviction_period(&self) -> Duration {
        (self.config.server.idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// Provider-to-provider calls go back through [`Host::call`], so they meet the same checks.
struct NestedCaller(Weak<Host>);

#[async_trait]
impl Caller for NestedCaller {
    async fn call(
        &self,
        ctx: &CallContext,
        service: &str,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError> {
        let host = self
            .0
            .upgrade()
            .ok_or_else(|| ProviderError::unavailable("the host is shutting down"))?;
        host.call(ctx.nested()?, service, action, payload).await
    }
}
