//! `/auth/token`, `/auth/refresh` and `/.well-known/jwks.json`: the token service over HTTP.
//!
//! Errors here speak OAuth2 (RFC 6749 §5.2: `error`, `error_description`), which client
//! libraries parse, and also carry the host's `error_code` and `request_id`. Each grant and
//! refresh, granted or refused, leaves one audit record; secrets are never hashed into it.

use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use providers_core::ErrorCode;
use providers_security::Identity;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, RequestId};
use crate::audit::{NO_TENANT, Record};
use crate::auth::{ClientInfo, Refusal, TokenService};
use crate::host::Host;

/// The parameters of a token or refresh request (unknown ones are ignored, RFC 6749 §3.2).
#[derive(Debug, Default, Deserialize)]
struct Params {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    refresh_token: Option<String>,
}

/// A refused request, in OAuth2's shape.
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    code: ErrorCode,
    retry_after: Option<u64>,
    /// What the audit record notes (the exact reason, which the client is not told).
    note: String,
}

impl OAuthError {
    fn new(
        status: StatusCode,
        error: &'static str,
        code: ErrorCode,
        description: impl Into<String>,
    ) -> Self {
        let description = description.into();
        Self {
            status,
            error,
            note: description.clone(),
            description,
            code,
            retry_after: None,
        }
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            ErrorCode::ValidationError,
            description,
        )
    }

    fn render(&self, request_id: &str) -> Response {
        let mut response = (
            self.status,
            Json(json!({
                "error": self.error,
                "error_description": self.description,
                "error_code": self.code.as_str(),
                "request_id": request_id,
            })),
        )
            .into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"provider-host\""),
            );
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, secs.into());
        }
        response
    }
}

fn refused(refusal: Refusal) -> OAuthError {
    match refusal {
        Refusal::InvalidClient { why, .. } => {
            let mut e = OAuthError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                ErrorCode::Unauthenticated,
                "client authentication failed (unknown client, wrong secret or revoked client)",
            );
            e.note = why.to_owned();
            e
        }
        Refusal::InvalidGrant(why) => OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            ErrorCode::Unauthenticated,
            why,
        ),
        Refusal::Store(e) => store_failed(&e),
    }
}

fn store_failed(e: &dyn std::fmt::Display) -> OAuthError {
    tracing::warn!(error = %e, "the token service's store failed");
    OAuthError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        ErrorCode::ProviderUnavailable,
        "the token service cannot reach its store now; the host log has the cause",
    )
}

/// The body as form (`application/x-www-form-urlencoded`, the standard) or JSON.
fn params(headers: &HeaderMap, body: &Bytes) -> Result<Params, OAuthError> {
    let kind = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match kind.as_str() {
        "application/x-www-form-urlencoded" => serde_urlencoded::from_bytes(body)
            .map_err(|e| OAuthError::invalid_request(format!("the form body is invalid: {e}"))),
        "application/json" => serde_json::from_slice(body)
            .map_err(|e| OAuthError::invalid_request(format!("the JSON body is invalid: {e}"))),
        "" if body.is_empty() => Ok(Params::default()),
        other => Err(OAuthError::invalid_request(format!(
            "Content-Type '{other}' is not accepted: send application/x-www-form-urlencoded or application/json"
        ))),
    }
}

/// Client credentials from HTTP Basic (RFC 6749 §2.3.1) or the body, not both.
fn credentials(headers: &HeaderMap, p: &Params) -> Result<(String, String), OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..6)
                .filter(|s| s.eq_ignore_ascii_case("basic "))
                .map(|_| &v[6..])
        });
    match (basic, &p.client_id, &p.client_secret) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(OAuthError::invalid_request(
            "client credentials were given twice (Authorization: Basic and the body); use one",
        )),
        (Some(b64), None, None) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    OAuthError::invalid_request(
                        "Authorization: Basic is not base64 of 'client_id:client_secret'",
                    )
                })?;
            let (id, secret) = decoded.split_once(':').ok_or_else(|| {
                OAuthError::invalid_request(
                    "Authorization: Basic is not base64 of 'client_id:client_secret'",
                )
            })?;
            Ok((id.to_owned(), secret.to_owned()))
        }
        (None, Some(id), Some(secret)) => Ok((id.clone(), secret.clone())),
        (None, None, _) => Err(OAuthError::invalid_request("client_id is missing")),
        (None, Some(_), None) => Err(OAuthError::invalid_request("client_secret is missing")),
    }
}

fn clip(s: &str) -> String {
    super::clip(s, 256)
}

/// What one request leaves in the trail.
struct Trail {
    started: Instant,
    tenant: String,
    subject: String,
    action: &'static str,
}

async fn record(host: &Host, request_id: &str, trail: Trail, outcome: Result<(), &OAuthError>) {
    let (outcome, code, note) = match outcome {
        Ok(()) => ("ok", String::new(), String::new()),
        Err(e) => (
            crate::audit::outcome_of(Some(e.code)),
            e.code.as_str().to_owned(),
            clip(&e.note),
        ),
    };
    host.audit()
        .record(Record {
            tenant: trail.tenant,
            kind: "token".into(),
            subject: trail.subject,
            service: "auth".into(),
            action: trail.action.into(),
            outcome: outcome.into(),
            error_code: code,
            request_id: request_id.to_owned(),
            latency_us: i64::try_from(trail.started.elapsed().as_micros()).unwrap_or(i64::MAX),
            payload_sha256: String::new(),
            note,
            at_ms: crate::audit::now_ms(),
        })
        .await;
}

fn service(host: &Host) -> Result<&TokenService, ApiError> {
    host.tokens().ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            "the token service is off on this host: set [auth] enabled = true to use it",
        )
    })
}

fn limited(l: crate::rate::Limited) -> OAuthError {
    let mut e = OAuthError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        ErrorCode::RateLimited,
        l.error.detail,
    );
    e.retry_after = Some(l.retry_after_secs);
    e
}

/// The access token and refresh token of `client`, as the 200 body.
async fn grant(
    host: &Host,
    tokens: &TokenService,
    client: &ClientInfo,
    refresh: String,
) -> Result<Response, OAuthError> {
    let generation = host.generation();
    let known = generation.config.tenants.contains_key(&client.tenant)
        || generation.config.admin.platform_tenant.as_deref() == Some(client.tenant.as_str());
    if !known {
        let mut e = refused(Refusal::InvalidClient {
            why: "",
            client: None,
        });
        e.note = format!(
            "the client's tenant '{}' is not configured on this host",
            client.tenant
        );
        return Err(e);
    }
    let issuer = generation.issuer().ok_or_else(|| {
        OAuthError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            ErrorCode::ProviderUnavailable,
            "no configured key can sign tokens",
        )
    })?;
    let ttl = tokens.settings.access_ttl.as_secs();
    let access = issuer
        .mint_identity(
            &Identity {
                subject: client.subject.as_str().into(),
                tenant: client.tenant.as_str().into(),
                roles: client.roles.as_slice().into(),
                company_id: client.company_id.as_deref().map(Into::into),
            },
            ttl,
        )
        .map_err(|e| store_failed(&e))?;
    let mut response = Json(json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl,
        "refresh_token": refresh,
        "refresh_expires_in": tokens.settings.refresh_ttl.as_secs(),
    }))
    .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// `POST /auth/token`: `grant_type=client_credentials` (or `refresh_token`, as `/auth/refresh`).
pub async fn token(
    State(host): State<Arc<Host>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let tokens = service(&host)?;
    let started = Instant::now();
    let p = match params(&headers, &body) {
        Ok(p) => p,
        Err(e) => return Ok(e.render(&request_id)),
    };
    match p.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some("refresh_token") => {
            return Ok(refresh_with(&host, tokens, &request_id, p, started).await);
        }
        Some(other) => {
            let e = OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                ErrorCode::ValidationError,
                format!(
                    "grant_type '{other}' is not supported (client_credentials, refresh_token)"
                ),
            );
            return Ok(e.render(&request_id));
        }
        None => {
            return Ok(
                OAuthError::invalid_request("grant_type is missing (client_credentials)")
                    .render(&request_id),
            );
        }
    }
    let (client_id, secret) = match credentials(&headers, &p) {
        Ok(c) => c,
        Err(e) => return Ok(e.render(&request_id)),
    };
    // Ids are short; a long one is no client, and must not become a rate-limit cell.
    if client_id.len() > 256 {
        return Ok(
            OAuthError::invalid_request("client_id is longer than 256 bytes").render(&request_id),
        );
    }
    let mut trail = Trail {
        started,
        tenant: NO_TENANT.to_owned(),
        subject: clip(&client_id),
        action: "client_credentials",
    };
    // Rate limits come before the hash, so refusals cost nothing; they are not recorded
    // one by one, like the provider calls' (a flood must not flood the shared queue).
    if let Err(l) = tokens.admit(Some(&client_id)) {
        return Ok(limited(l).render(&request_id));
    }
    let pool = host.storage().pool();
    let result = match tokens.authenticate(pool, &client_id, &secret).await {
        Ok(client) => {
            trail.tenant = client.tenant.clone();
            trail.subject = clip(&client.subject);
            match tokens.issue_refresh(pool, &client.client_id, None).await {
                Ok(refresh) => grant(&host, tokens, &client, refresh).await,
                Err(e) => Err(store_failed(&e)),
            }
        }
        Err(refusal) => {
            if let Refusal::InvalidClient {
                client: Some(c), ..
            } = &refusal
            {
                trail.tenant = c.tenant.clone();
                trail.subject = clip(&c.subject);
            }
            Err(refused(refusal))
        }
    };
    Ok(finish(&host, &request_id, trail, result).await)
}

async fn finish(
    host: &Host,
    request_id: &str,
    trail: Trail,
    result: Result<Response, OAuthError>,
) -> Response {
    match result {
        Ok(response) => {
            record(host, request_id, trail, Ok(())).await;
            response
        }
        Err(e) => {
            record(host, request_id, trail, Err(&e)).await;
            e.render(request_id)
        }
    }
}

/// `POST /auth/refresh`: `refresh_token=…` → a new access token and the family's next refresh token.
pub async fn refresh(
    State(host): State<Arc<Host>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let tokens = service(&host)?;
    let started = Instant::now();
    let p = match params(&headers, &body) {
        Ok(p) => p,
        Err(e) => return Ok(e.render(&request_id)),
    };
    Ok(refresh_with(&host, tokens, &request_id, p, started).await)
}

async fn refresh_with(
    host: &Host,
    tokens: &TokenService,
    request_id: &str,
    p: Params,
    started: Instant,
) -> Response {
    let Some(token) = p.refresh_token.filter(|t| !t.is_empty()) else {
        return OAuthError::invalid_request("refresh_token is missing").render(request_id);
    };
    if let Err(l) = tokens.admit(None) {
        return limited(l).render(request_id);
    }
    let mut trail = Trail {
        started,
        tenant: NO_TENANT.to_owned(),
        subject: String::new(),
        action: "refresh_token",
    };
    let pool = host.storage().pool();
    let result = match tokens.rotate(pool, &token).await {
        Ok((client, next)) => {
            trail.tenant = client.tenant.clone();
            trail.subject = clip(&client.subject);
            grant(host, tokens, &client, next).await
        }
        Err(refusal) => {
            // A refused refresh names its client's tenant when the token is known, so a
            // reuse shows in that tenant's trail.
            if let Ok(Some(c)) = crate::auth::client_of_refresh(pool, &token).await {
                trail.tenant = c.tenant.clone();
                trail.subject = clip(&c.subject);
            }
            Err(refused(refusal))
        }
    };
    finish(host, request_id, trail, result).await
}

/// `GET /.well-known/jwks.json`: the public keys tokens of this host are signed with.
pub async fn jwks(State(host): State<Arc<Host>>) -> Result<Response, ApiError> {
    let set = host.generation().jwks();
    if set["keys"].as_array().is_none_or(|k| k.is_empty()) {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "this host has no public signing key to publish (HS256 secrets are never published; configure an RS256 key)",
        ));
    }
    let mut response = Json(set).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    Ok(response)
}
