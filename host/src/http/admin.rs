//! `/admin`: the providers' lifecycle and the host's configuration, for platform operators
//! (every tenant, the configuration) and tenant administrators (their own tenant).

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, body::Bytes};
use providers_core::{ErrorCode, ProviderError};
use serde::Deserialize;
use serde_json::{Value, json};

use super::routes::{authorization, bad_path};
use super::{ApiError, RequestId};
use crate::config::ConfigError;
use crate::host::{ALL_TENANTS, Admin, AdminScope, Generation, Host, reload::ReloadError};

fn admin(host: &Host, headers: &HeaderMap) -> Result<(Arc<Generation>, Admin), ApiError> {
    let generation = host.generation();
    let admin = generation.admin(authorization(headers))?;
    Ok((generation, admin))
}

fn error_json(e: &ConfigError) -> Value {
    json!({"file": e.file, "line": e.line, "column": e.column, "message": e.message})
}

/// 422 in the one error shape, with every configuration error listed under `errors`.
fn invalid(request_id: &str, errors: &[ConfigError]) -> Response {
    let body = json!({
        "error_code": ErrorCode::ValidationError.as_str(),
        "detail": format!(
            "the configuration has {} error(s); nothing was applied, the running configuration stays in force",
            errors.len()
        ),
        "errors": errors.iter().map(error_json).collect::<Vec<_>>(),
        "request_id": request_id,
        "timestamp": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    });
    (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
}

fn reload_error(request_id: &str, e: ReloadError) -> Response {
    match e {
        ReloadError::Invalid(errors) => invalid(request_id, &errors),
        ReloadError::NoSource => ApiError::new(ErrorCode::Conflict, e.to_string()).into_response(),
        ReloadError::Failed(why) => {
            ApiError::new(ErrorCode::ProviderUnavailable, why).into_response()
        }
    }
}

/// The query of `GET /admin/providers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersQuery {
    /// One tenant.
    tenant: Option<String>,
    /// One service.
    service: Option<String>,
    /// Tenants after this name (the previous page's `next`).
    after: Option<String>,
    /// Tenants per page: 1 to 1000, default 100.
    limit: Option<usize>,
}

/// The most tenants one page of `GET /admin/providers` lists.
const MAX_PAGE_TENANTS: usize = 1000;

/// `GET /admin/providers`: every configured service with its version, kind and state per
/// tenant (a tenant administrator sees their own tenant only), a page of tenants at a time.
pub async fn providers(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    query: Result<Query<ProvidersQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (generation, admin) = admin(&host, &headers)?;
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            ErrorCode::ValidationError,
            format!("invalid query: {}", e.body_text()),
        )
    })?;
    let config = &generation.config;
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_PAGE_TENANTS).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::ValidationError,
            format!("limit: {limit} is out of range (1 to {MAX_PAGE_TENANTS})"),
        ));
    }
    if let Some(s) = &query.service
        && !config.services.contains_key(s)
    {
        return Err(ProviderError::not_found(format!(
            "no service '{s}' is configured on this host"
        ))
        .into());
    }
    if let Some(t) = &query.tenant {
        admin.check(t)?;
        if !config.tenants.contains_key(t) {
            return Err(ProviderError::not_found(format!(
                "no tenant '{t}' is configured on this host"
            ))
            .into());
        }
    }
    let mut page: Vec<&String> = config
        .tenants
        .keys()
        .filter(|t| admin.may(t))
        .filter(|t| query.tenant.as_ref().is_none_or(|only| only == *t))
        .filter(|t| query.after.as_ref().is_none_or(|after| *t > after))
        .take(limit + 1)
        .collect();
    let next = (page.len() > limit).then(|| {
        page.truncate(limit);
        page.last().map(|t| t.to_string())
    });
    let instances = host.instances().snapshot();
    let mut services = Vec::new();
    for (name, plan) in &config.services {
        if query.service.as_ref().is_some_and(|only| only != name) {
            continue;
        }
        let d = plan.factory.descriptor();
        let mut tenants = Vec::new();
        for tenant in &page {
            let tenant = *tenant;
            let Some(tplan) = config.tenants.get(tenant) else {
                continue;
            };
            let Some(ts) = tplan.services.get(name) else {
                continue;
            };
            let instance = instances
                .iter()
                .find(|i| &i.tenant == tenant && &i.service == name);
            tenants.push(json!({
                "tenant": tenant,
                "version": ts.service.factory.descriptor().version.to_string(),
                "enabled": !generation.controls.disabled(tenant, name),
                "paused": generation.controls.paused(tenant, name).is_some(),
                "instance": instance.map(|i| json!({
                    "state": i.state,
                    "version": i.version,
                    "calls_in_flight": i.inflight,
                    "current": i.revision == ts.revision,
                })),
            }));
        }
        services.push(json!({
            "service": name,
            "version": d.version.to_string(),
            "kind": plan.factory.kind(),
            "origin": plan.factory.origin(),
            "required": plan.required,
            "unavailable": plan.unavailable,
            "paused_for_all": generation.controls.paused.get(ALL_TENANTS).is_some_and(|s| s.contains(name)),
            "tenants": tenants,
        }));
    }
    let scope = match &admin.scope {
        AdminScope::Platform => json!("platform"),
        AdminScope::Tenant(t) => json!({"tenant": t}),
    };
    Ok(Json(json!({
        "generation": generation.number,
        "source": config.source,
        "scope": scope,
        "services": services,
        "next": next.flatten(),
    })))
}

/// `POST /admin/config/validate`: a whole configuration (TOML) checked, nothing applied.
pub async fn validate(
    State(host): State<Arc<Host>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (_, admin) = admin(&host, &headers)?;
    admin.platform("validating the configuration")?;
    let body = body.map_err(|e| ApiError {
        error: ProviderError::validation(format!("the body could not be read: {}", e.body_text())),
        status: Some(e.status()),
        retry_after: None,
    })?;
    let text = String::from_utf8(body.to_vec()).map_err(|e| {
        ApiError::new(
            ErrorCode::ValidationError,
            format!("the body is not UTF-8 text: {e}"),
        )
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::new(
            ErrorCode::ValidationError,
            "the body must be a whole configuration in TOML",
        ));
    }
    match host.validate(text).await {
        Ok(Ok((services, tenants, warnings))) => Ok(Json(json!({
            "valid": true,
            "services": services,
            "tenants": tenants,
            "warnings": warnings,
        }))
        .into_response()),
        Ok(Err(errors)) => Ok(invalid(&request_id, &errors)),
        Err(e) => Ok(reload_error(&request_id, e)),
    }
}

/// `POST /admin/config/reload` (and `/admin/plugins/reload`): reads the configuration and
/// the plugin folders again and applies the difference.
pub async fn reload(
    State(host): State<Arc<Host>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (_, admin) = admin(&host, &headers)?;
    admin.platform("reloading the configuration")?;
    tracing::info!(by = %admin.by(), "reload requested over /admin");
    Ok(match host.reload().await {
        Ok(report) => Json(json!(report)).into_response(),
        Err(e) => reload_error(&request_id, e),
    })
}

/// The optional body of pause, resume and restart.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// One tenant; absent means every tenant for a platform operator, and the caller's own
    /// tenant for a tenant administrator.
    tenant: Option<String>,
}

fn target(body: Result<Json<Target>, JsonRejection>, raw_empty: bool) -> Result<Target, ApiError> {
    if raw_empty {
        return Ok(Target::default());
    }
    body.map(|Json(t)| t).map_err(|e| {
        ApiError::new(
            ErrorCode::ValidationError,
            format!(
                "invalid body: {} (expected {{\"tenant\": \"name\"}} or nothing)",
                e.body_text()
            ),
        )
    })
}

/// The tenant an action applies to (`None`: every tenant), checked against the caller.
fn scope_of(
    generation: &Generation,
    admin: &Admin,
    service: &str,
    tenant: Option<String>,
) -> Result<Option<String>, ApiError> {
    if !generation.config.services.contains_key(service) {
        return Err(ProviderError::not_found(format!(
            "no service '{service}' is configured on this host"
        ))
        .into());
    }
    let tenant = match (tenant, &admin.scope) {
        (Some(t), _) => Some(t),
        (None, AdminScope::Platform) => None,
        (None, AdminScope::Tenant(own)) => Some(own.clone()),
    };
    if let Some(t) = &tenant {
        admin.check(t)?;
        let plan = generation.config.tenants.get(t).ok_or_else(|| {
            ProviderError::not_found(format!("no tenant '{t}' is configured on this host"))
        })?;
        if !plan.services.contains_key(service) {
            return Err(ProviderError::not_found(format!(
                "tenant '{t}' does not enable service '{service}'"
            ))
            .into());
        }
    }
    Ok(tenant)
}

/// `FORBIDDEN` when a tenant administrator would clear a switch a platform operator set.
async fn keeps_platform_switch(
    host: &Host,
    generation: &Generation,
    admin: &Admin,
    tenant: &str,
    service: &str,
    control: &str,
) -> Result<(), ApiError> {
    let (AdminScope::Tenant(_), Some(platform)) =
        (&admin.scope, &generation.config.admin.platform_tenant)
    else {
        return Ok(());
    };
    let setter = host
        .storage()
        .control_setter(tenant, service, control)
        .await
        .map_err(|e| ProviderError::unavailable(format!("storage: {e}")))?;
    if setter.is_some_and(|by| by.rsplit('@').next() == Some(platform.as_str())) {
        let what = if control == "paused" {
            "paused"
        } else {
            "disabled"
        };
        return Err(ProviderError::forbidden(format!(
            "'{service}' was {what} for tenant '{tenant}' by a platform operator; only a platform operator can undo it"
        ))
        .into());
    }
    Ok(())
}

async fn pause_or_resume(
    host: Arc<Host>,
    headers: HeaderMap,
    service: Result<Path<String>, PathRejection>,
    body: Result<Json<Target>, JsonRejection>,
    on: bool,
) -> Result<Json<Value>, ApiError> {
    let Path(service) = service.map_err(bad_path)?;
    let (generation, admin) = admin(&host, &headers)?;
    let empty = is_empty_body(&headers);
    let tenant = scope_of(&generation, &admin, &service, target(body, empty)?.tenant)?;
    let stored = tenant.as_deref().unwrap_or(ALL_TENANTS);
    if !on {
        keeps_platform_switch(&host, &generation, &admin, stored, &service, "paused").await?;
    }
    let changed = host
        .set_control(stored, &service, "paused", on, &admin.by())
        .await?;
    Ok(Json(json!({
        "service": service,
        "tenant": tenant,
        "paused": on,
        "changed": changed,
    })))
}

fn is_empty_body(headers: &HeaderMap) -> bool {
    let length = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    length == Some(0)
        || (length.is_none() && !headers.contains_key(axum::http::header::CONTENT_TYPE))
}

/// `POST /admin/providers/{service}/pause`: calls answer 503 until resumed; kept across restarts.
pub async fn pause(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    service: Result<Path<String>, PathRejection>,
    body: Result<Json<Target>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    pause_or_resume(host, headers, service, body, true).await
}

/// `POST /admin/providers/{service}/resume`.
pub async fn resume(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    service: Result<Path<String>, PathRejection>,
    body: Result<Json<Target>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    pause_or_resume(host, headers, service, body, false).await
}

/// `POST /admin/providers/{service}/restart`: a new instance connects, then takes over.
pub async fn restart(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    service: Result<Path<String>, PathRejection>,
    body: Result<Json<Target>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(service) = service.map_err(bad_path)?;
    let (generation, admin) = admin(&host, &headers)?;
    let empty = is_empty_body(&headers);
    let tenant = scope_of(&generation, &admin, &service, target(body, empty)?.tenant)?;
    let (restarted, failed) = host.restart(&service, tenant.as_deref()).await;
    tracing::info!(by = %admin.by(), service, restarted = restarted.len(), failed = failed.len(), "restart requested over /admin");
    if let (Some(t), Some((_, why))) = (&tenant, failed.first()) {
        return Err(ProviderError::unavailable(format!(
            "the new instance of '{service}' for tenant '{t}' did not connect, the old one keeps serving: {why}"
        ))
        .into());
    }
    Ok(Json(json!({
        "service": service,
        "restarted": restarted,
        "failed": failed.iter().map(|(t, why)| json!({"tenant": t, "detail": why})).collect::<Vec<_>>(),
    })))
}

async fn enable_or_disable(
    host: Arc<Host>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    enable: bool,
) -> Result<Json<Value>, ApiError> {
    let Path((tenant, service)) = path.map_err(bad_path)?;
    let (generation, admin) = admin(&host, &headers)?;
    admin.check(&tenant)?;
    let plan = generation.config.tenants.get(&tenant).ok_or_else(|| {
        ProviderError::not_found(format!("no tenant '{tenant}' is configured on this host"))
    })?;
    if !generation.config.services.contains_key(&service) {
        return Err(ProviderError::not_found(format!(
            "no service '{service}' is configured on this host"
        ))
        .into());
    }
    if !plan.services.contains_key(&service) {
        return Err(ProviderError::conflict(format!(
            "tenant '{tenant}' does not list service '{service}' in its configuration; add it to [tenants.{tenant}] services and reload (disable and enable switch only what the configuration allows)"
        ))
        .into());
    }
    if enable {
        keeps_platform_switch(&host, &generation, &admin, &tenant, &service, "disabled").await?;
    }
    let changed = host
        .set_control(&tenant, &service, "disabled", !enable, &admin.by())
        .await?;
    Ok(Json(json!({
        "tenant": tenant,
        "service": service,
        "enabled": enable,
        "changed": changed,
    })))
}

/// `POST /admin/tenants/{tenant}/services/{service}/enable`.
pub async fn enable(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    enable_or_disable(host, headers, path, true).await
}

/// `POST /admin/tenants/{tenant}/services/{service}/disable`: hidden from the tenant
/// (404, as if not enabled) until enabled again; kept across restarts.
pub async fn disable(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    enable_or_disable(host, headers, path, false).await
}

/// `GET /admin/audit`: one chain of the audit trail, oldest first, filtered and paged. A
/// tenant administrator reads their own tenant's; a platform operator names any chain (a
/// tenant, the platform tenant, or `-` for requests that named no configured tenant).
pub async fn audit(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    query: Result<Query<crate::audit::Filter>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (_, admin) = admin(&host, &headers)?;
    let Query(filter) = query.map_err(|e| {
        ApiError::new(
            ErrorCode::ValidationError,
            format!("invalid query: {}", e.body_text()),
        )
    })?;
    let tenant = match (&filter.tenant, &admin.scope) {
        (Some(t), _) => {
            admin.check(t)?;
            t.clone()
        }
        (None, AdminScope::Tenant(own)) => own.clone(),
        (None, AdminScope::Platform) => {
            return Err(ApiError::new(
                ErrorCode::ValidationError,
                "tenant: name the chain to read (a tenant, the platform tenant, or '-' for requests without a configured tenant)",
            ));
        }
    };
    if let Some(limit) = filter.limit
        && !(1..=1000).contains(&limit)
    {
        return Err(ApiError::new(
            ErrorCode::ValidationError,
            format!("limit: {limit} is out of range (1 to 1000)"),
        ));
    }
    let (records, next) = crate::audit::list(host.storage().pool(), &tenant, &filter)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "reading the audit trail failed");
            ApiError::new(
                ErrorCode::ProviderUnavailable,
                "the audit trail cannot be read now; the host log has the cause",
            )
        })?;
    Ok(Json(
        json!({"tenant": tenant, "records": records, "next": next}),
    ))
}

/// The query of `GET /admin/clients`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientsQuery {
    /// One tenant (a tenant administrator's own, whether named or not).
    tenant: Option<String>,
}

fn token_service(host: &Host) -> Result<&crate::auth::TokenService, ApiError> {
    host.tokens().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Conflict,
            "the token service is off on this host: set [auth] enabled = true to manage its clients",
        )
    })
}

fn store_error(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "the token service's store failed");
    ApiError::new(
        ErrorCode::ProviderUnavailable,
        "the token service's store cannot be reached now; the host log has the cause",
    )
}

/// `GET /admin/clients`: the token service's clients (never their secrets).
pub async fn clients(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    query: Result<Query<ClientsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (_, admin) = admin(&host, &headers)?;
    token_service(&host)?;
    let Query(q) = query.map_err(|e| {
        ApiError::new(
            ErrorCode::ValidationError,
            format!("invalid query: {}", e.body_text()),
        )
    })?;
    let tenant = match (&q.tenant, &admin.scope) {
        (Some(t), _) => {
            admin.check(t)?;
            Some(t.clone())
        }
        (None, AdminScope::Tenant(own)) => Some(own.clone()),
        (None, AdminScope::Platform) => None,
    };
    let list = crate::auth::list_clients(host.storage().pool(), tenant.as_deref())
        .await
        .map_err(store_error)?;
    Ok(Json(json!({ "clients": list })))
}

/// The body of `POST /admin/clients`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewClientBody {
    /// The client's tenant: a tenant administrator's own when absent.
    tenant: Option<String>,
    /// Its tokens' subject (the client id when absent).
    subject: Option<String>,
    /// Its tokens' roles, each defined in `[security.roles]` (or the admin role).
    roles: Vec<String>,
    /// Its tokens' company.
    company_id: Option<String>,
}

/// `POST /admin/clients`: a new client; its secret is in this answer and nowhere else.
pub async fn add_client(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    body: Result<Json<NewClientBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (generation, admin) = admin(&host, &headers)?;
    let tokens = token_service(&host)?;
    let Json(body) = body.map_err(|e| {
        ApiError::new(
            ErrorCode::ValidationError,
            format!("invalid body: {}", e.body_text()),
        )
    })?;
    let tenant = match (&body.tenant, &admin.scope) {
        (Some(t), _) => t.clone(),
        (None, AdminScope::Tenant(own)) => own.clone(),
        (None, AdminScope::Platform) => {
            return Err(ApiError::new(
                ErrorCode::ValidationError,
                "tenant: name the tenant the client's tokens are for",
            ));
        }
    };
    admin.check(&tenant)?;
    let new = crate::auth::NewClient {
        tenant,
        subject: body.subject,
        roles: body.roles,
        company_id: body.company_id,
        created_by: admin.by(),
    };
    crate::auth::check_new(&generation.config, &new)
        .map_err(|m| ApiError::new(ErrorCode::ValidationError, m))?;
    let _permit = tokens.hashing_permit().await;
    let created = crate::auth::add_client(host.storage().pool(), tokens.hasher(), new)
        .await
        .map_err(store_error)?;
    tracing::info!(client = %created.client.client_id, tenant = %created.client.tenant, by = %admin.by(), "token client created");
    Ok((StatusCode::CREATED, Json(json!(created))).into_response())
}

/// `POST /admin/clients/{client_id}/revoke`: the client and every refresh token it holds.
pub async fn revoke_client(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (_, admin) = admin(&host, &headers)?;
    token_service(&host)?;
    let Path(client_id) = path.map_err(bad_path)?;
    let scope = match &admin.scope {
        AdminScope::Platform => None,
        AdminScope::Tenant(own) => Some(own.as_str()),
    };
    // Another tenant's client is "not found": its existence is not told.
    let revoked = crate::auth::revoke_client(host.storage().pool(), &client_id, scope)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no client '{client_id}'")))?;
    tracing::info!(client = %client_id, by = %admin.by(), "token client revoked");
    Ok(Json(json!({ "client": revoked })))
}

/// `GET /admin/instances`: every live instance (a tenant administrator's own tenant's) with
/// its provider's own status, when it connected, its calls, errors and last error.
pub async fn instances(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (generation, admin) = admin(&host, &headers)?;
    let deadline = std::time::Instant::now() + generation.config.server.ready_timeout;
    let mine: Vec<_> = host
        .instances()
        .snapshot()
        .into_iter()
        .filter(|i| admin.may(&i.tenant))
        .collect();
    // Every provider's status at once, under one bound.
    let statuses = futures_util::future::join_all(
        mine.iter()
            .map(|i| host.instances().status(&i.tenant, &i.service, deadline)),
    )
    .await;
    let list: Vec<Value> = mine
        .iter()
        .zip(statuses)
        .map(|(i, status)| {
            json!({
                "tenant": i.tenant,
                "service": i.service,
                "version": i.version,
                "kind": i.kind,
                "state": i.state,
                "status": status.map(|s| json!({"state": s.state, "detail": s.detail})),
                "connected_since_ms": i.connected_ms,
                "calls": i.calls,
                "errors": i.errors,
                "calls_in_flight": i.inflight,
                "last_error": i.last_error.as_ref().map(|(at, code, detail)| json!({"at_ms": at, "error_code": code, "detail": detail})),
                "connect_failure": i.connect_failure,
            })
        })
        .collect();
    Ok(Json(json!({ "instances": list })))
}
