//! Route handlers. They authenticate, delegate to [`Host`] and shape the success body.

use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use providers_core::{ErrorCode, ProviderError};
use serde_json::{Value, json};

use super::{ApiError, RequestId};
use crate::config::{Config, TenantPlan};
use crate::host::Host;
use providers_security::Identity;

pub(super) fn bad_path(rejection: PathRejection) -> ApiError {
    ApiError::new(
        ErrorCode::ValidationError,
        format!("invalid path: {}", rejection.body_text()),
    )
}

pub(super) fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Counts the request against its tenant's and client's rate limits (429 with `Retry-After`).
fn admit(config: &Config, plan: &TenantPlan, identity: &Identity) -> Result<(), ApiError> {
    if !plan.rate.is_limited() {
        return Ok(());
    }
    plan.rate
        .admit(&identity.tenant, &identity.subject)
        .inspect_err(|_| crate::observe::rate_limited(config, &identity.tenant))
        .map_err(|limited| ApiError {
            error: limited.error,
            status: None,
            retry_after: Some(limited.retry_after_secs),
        })
}

/// Longest `Idempotency-Key` accepted.
const IDEMPOTENCY_KEY_MAX: usize = 200;

/// The request's `Idempotency-Key`, handed to the provider in the call context (a provider
/// that creates something returns the same result for the same key): 1 to 200 visible ASCII
/// characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<Arc<str>>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key)
            if !key.is_empty()
                && key.len() <= IDEMPOTENCY_KEY_MAX
                && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(Arc::from(key)))
        }
        _ => Err(ApiError::new(
            ErrorCode::ValidationError,
            format!(
                "header Idempotency-Key: must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters (no spaces)"
            ),
        )),
    }
}

/// `POST /providers/{service}/{action}`.
///
/// Takes the raw request rather than `HeaderMap` and `Bytes` extractors: those copy every
/// header, and reading the body here lets the limit error say which setting to raise.
pub async fn call(
    State(host): State<Arc<Host>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    path: Result<Path<(String, String)>, PathRejection>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let Path((service, action)) = path.map_err(bad_path)?;
    let (mut parts, body) = request.into_parts();
    let idempotency_key = idempotency_key(&parts.headers)?;
    // One generation for the whole request, and for the nested calls it makes: the one the
    // audit layer authenticated against, when it did.
    let (generation, identity) = match parts.extensions.remove::<super::Authenticated>() {
        Some(done) => (done.generation, done.identity?),
        None => {
            let generation = host.generation();
            let identity = generation.authenticate(authorization(&parts.headers))?;
            // Without the audit layer, the access line learns the caller here.
            if let Some(caller) = parts.extensions.get::<Arc<super::Caller>>() {
                let _ = caller
                    .0
                    .set((identity.tenant.clone(), identity.subject.clone()));
            }
            super::record_caller(&identity.tenant, &identity.subject);
            (generation, identity)
        }
    };
    admit(
        &generation.config,
        generation.tenant(&identity.tenant)?,
        &identity,
    )?;
    let server = &generation.config.server;
    let limit = server.body_limit_bytes;
    // A body that trickles in is cut off: within the body timeout and the call's own deadline.
    let read_for = server.body_read_timeout.min(server.request_timeout);
    let read = tokio::time::timeout(read_for, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError {
            error: ProviderError::new(
                ErrorCode::Timeout,
                format!(
                    "request body was not received within {} (server.body_read_timeout)",
                    humantime::format_duration(read_for)
                ),
            ),
            status: Some(StatusCode::REQUEST_TIMEOUT),
            retry_after: None,
        })?;
    let body = read.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            ApiError {
                error: ProviderError::validation(format!(
                    "request body exceeds the limit of {limit} bytes (server.body_limit_bytes)"
                )),
                status: Some(StatusCode::PAYLOAD_TOO_LARGE),
                retry_after: None,
            }
        } else {
            ApiError::new(
                ErrorCode::ValidationError,
                format!("request body could not be read: {e}"),
            )
        }
    })?;
    if let Some(slot) = parts.extensions.get::<Arc<super::AuditSlot>>() {
        let _ = slot.payload.set(crate::audit::sha256_hex(&body));
    }
    // An empty body is an empty object, so parameterless actions need no body.
    let payload = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                ErrorCode::ValidationError,
                format!("request body is not valid JSON: {e}"),
            )
        })?
    };
    let ctx = host
        .context(identity, &request_id)
        .with_idempotency_key(idempotency_key);
    let data = host
        .call_in(&generation, ctx, &service, &action, payload)
        .await?;
    // Built by hand: `json!` would copy `data` through `to_value`, a second copy of a large result.
    let mut body = serde_json::Map::new();
    body.insert("data".into(), data);
    body.insert("request_id".into(), Value::String(request_id.to_string()));
    Ok(Json(Value::Object(body)))
}

/// `GET /providers`: what the caller's tenant can call.
pub async fn list(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let generation = host.generation();
    let identity = generation.authenticate(authorization(&headers))?;
    let tenant = generation.tenant(&identity.tenant)?;
    admit(&generation.config, tenant, &identity)?;
    let deadline = Instant::now() + generation.config.server.ready_timeout;
    let services: Vec<_> = generation.services_of(&identity.tenant, tenant).collect();
    // Every service's status at once, under one bound.
    let statuses = futures_util::future::join_all(services.iter().map(|(name, enabled)| {
        status(
            &host,
            &generation,
            &identity.tenant,
            name,
            enabled,
            deadline,
        )
    }))
    .await;
    let services: Vec<Value> = services
        .into_iter()
        .zip(statuses)
        .map(|((name, enabled), status)| {
            let factory = &enabled.service.factory;
            let d = factory.descriptor();
            let actions: Vec<Value> = d
                .actions
                .iter()
                .map(|a| json!({"name": a.name, "permission": a.permission, "idempotent": a.idempotent}))
                .collect();
            json!({
                "service": name,
                "version": d.version.to_string(),
                "description": d.description,
                "kind": factory.kind(),
                "status": status,
                "actions": actions,
            })
        })
        .collect();
    Ok(Json(
        json!({"tenant": &*identity.tenant, "providers": services}),
    ))
}

async fn status(
    host: &Host,
    generation: &crate::host::Generation,
    tenant: &str,
    service: &str,
    enabled: &crate::config::TenantService,
    deadline: Instant,
) -> Value {
    if let Some(reason) = &enabled.service.unavailable {
        return json!({"state": "unavailable", "detail": reason});
    }
    if generation.controls.paused(tenant, service).is_some() {
        return json!({"state": "paused", "detail": "paused by an administrator"});
    }
    match host.instances().status(tenant, service, deadline).await {
        Some(s) => json!({"state": s.state, "detail": s.detail}),
        None => {
            json!({"state": "idle", "detail": "no instance yet; one connects on the first call"})
        }
    }
}

/// `GET /providers/{service}`: one service in full, with its action schemas.
pub async fn describe(
    State(host): State<Arc<Host>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let Path(service) = path.map_err(bad_path)?;
    let generation = host.generation();
    let identity = generation.authenticate(authorization(&headers))?;
    let tenant = generation.tenant(&identity.tenant)?;
    admit(&generation.config, tenant, &identity)?;
    let enabled = generation.service(&identity.tenant, tenant, &service)?;
    let factory = &enabled.service.factory;
    let d = factory.descriptor();
    let deadline = Instant::now() + generation.config.server.ready_timeout;
    Ok(Json(json!({
        "service": service,
        "version": d.version.to_string(),
        "contract_version": d.contract_version.to_string(),
        "description": d.description,
        "kind": factory.kind(),
        "status": status(&host, &generation, &identity.tenant, &service, enabled, deadline).await,
        "actions": d.actions,
        "limits": {
            "timeout_ms": enabled.limits.timeout.map(|t| t.as_millis() as u64),
            "max_concurrency": enabled.limits.max_concurrency,
        },
    })))
}

/// `GET /openapi.json`.
pub async fn openapi(State(host): State<Arc<Host>>) -> Json<Value> {
    Json(Value::clone(&host.openapi()))
}

/// `GET /health`: the process is alive.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /ready`: whether this replica should receive traffic (see [`Host::readiness`]).
/// Public, so it says only ready or not, with generic reasons; each tenant's own detail is
/// in `GET /providers`, behind its token.
pub async fn ready(State(host): State<Arc<Host>>) -> Result<Json<Value>, ApiError> {
    let readiness = host.readiness().await;
    if readiness.ready && readiness.unavailable.is_empty() {
        Ok(Json(json!({"status": "ready"})))
    } else if readiness.ready {
        Ok(Json(
            json!({"status": "ready", "unavailable": readiness.unavailable}),
        ))
    } else {
        Err(ApiError::new(
            ErrorCode::ProviderUnavailable,
            format!("not ready: {}", readiness.reasons.join("; ")),
        ))
    }
}

/// Any other path.
pub async fn not_found() -> Response {
    ApiError::new(ErrorCode::NotFound, "no such route; see /openapi.json").into_response()
}

/// A known path with the wrong method.
pub async fn method_not_allowed() -> Response {
    ApiError {
        error: ProviderError::validation("method not allowed on this route; see /openapi.json"),
        status: Some(StatusCode::METHOD_NOT_ALLOWED),
        retry_after: None,
    }
    .into_response()
}

/// `GET /metrics`: every metric in the Prometheus text format. A platform operator's token
/// unless `[observability] metrics = "open"` (loopback listeners only); 404 when `"off"`.
pub async fn metrics(
    State(host): State<Arc<Host>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    use crate::observe::MetricsAccess;
    let generation = host.generation();
    match generation.config.observability.metrics {
        MetricsAccess::Off => {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                "metrics are off on this host ([observability] metrics = \"off\")",
            ));
        }
        MetricsAccess::Open => {}
        MetricsAccess::Operator => {
            generation
                .admin(authorization(&headers))?
                .platform("reading /metrics")?;
        }
    }
    crate::observe::refresh_gauges(&host, &generation);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        providers_observability::render(),
    )
        .into_response())
}
