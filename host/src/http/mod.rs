//! HTTP: the router, the request-id middleware and serving with graceful shutdown.

mod admin;
mod auth;
mod error;
pub mod openapi;
mod routes;
mod serve;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::Request;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use providers_core::ErrorCode;
use tower::util::option_layer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

pub use error::{ApiError, status_of};
pub use serve::ConnectionLimits;

use crate::config::CorsConfig;
use crate::host::Host;

/// The request id of the current request, accepted from `x-request-id` or generated.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

const REQUEST_ID: &str = "x-request-id";

/// A client's id is kept when it is short and plain; anything else is replaced, not trusted into logs.
fn acceptable_id(value: &HeaderValue) -> Option<&str> {
    let s = value.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then_some(s)
}

/// Headers every response carries: the API serves JSON only, so nothing may sniff, frame or
/// embed it, and no referrer leaves with a link from it.
const SECURITY_HEADERS: [(HeaderName, &str); 4] = [
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; frame-ancestors 'none'",
    ),
    (header::REFERRER_POLICY, "no-referrer"),
];

async fn request_context(
    State(host): State<Arc<Host>>,
    mut request: Request,
    next: Next,
) -> Response {
    let id: Arc<str> = match request.headers().get(REQUEST_ID).and_then(acceptable_id) {
        Some(id) => Arc::from(id),
        None => Arc::from(uuid::Uuid::new_v4().to_string()),
    };
    request.extensions_mut().insert(RequestId(id.clone()));
    // One span per request (target `provider_host::request`); the provider calls it makes
    // nest inside. Disabled by the filter, it costs one check.
    let span = tracing::info_span!(
        target: "provider_host::request",
        "request",
        // Strings given as `&str`, not `%`: no trip through `fmt` per field.
        request_id = &*id,
        method = request.method().as_str(),
        path = clipped(request.uri().path(), 256),
        tenant = tracing::field::Empty,
        subject = tracing::field::Empty,
        status = tracing::field::Empty,
        error_code = tracing::field::Empty,
    );
    // The access line costs nothing when its target is filtered out: no caller slot for the
    // inner layers to fill, no copy of the path.
    let access = providers_observability::access_enabled().then(|| {
        let who = Arc::new(Caller::default());
        request.extensions_mut().insert(who.clone());
        (
            Instant::now(),
            who,
            request.method().clone(),
            // A reference count, not a copy of the path.
            request.uri().clone(),
        )
    });
    // A W3C trace context from the caller makes this request part of its trace (only when
    // traces are exported; otherwise the header is not even read).
    if let Some(parent) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        let state = request
            .headers()
            .get("tracestate")
            .and_then(|v| v.to_str().ok());
        providers_observability::adopt_remote_parent(&span, parent, state);
    }
    let mut response = next.run(request).instrument(span.clone()).await;
    if !span.is_disabled() && providers_observability::traces_exported() {
        tracing::record_all!(
            span,
            status = response.status().as_u16(),
            error_code = response
                .extensions()
                .get::<Arc<ApiError>>()
                .map(|e| e.error.code.as_str()),
        );
    }
    if let Some((started, who, method, uri)) = access {
        let code = response
            .extensions()
            .get::<Arc<ApiError>>()
            .map(|e| e.error.code.as_str());
        let (tenant, subject) = who.0.get().map_or(("", ""), |(t, s)| (&**t, &**s));
        // One line per request, its fields documented in docs/operations.md.
        tracing::info!(
            target: "provider_host::access",
            request_id = &*id,
            method = method.as_str(),
            path = clipped(uri.path(), 256),
            status = response.status().as_u16(),
            latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            tenant,
            subject = clipped(subject, 256),
            error_code = code.unwrap_or(""),
            "request"
        );
    }
    if let Some(error) = response.extensions_mut().remove::<Arc<ApiError>>() {
        // Headers set on the way out (CORS) stay; the body's own are the rendered ones.
        let set = std::mem::take(response.headers_mut());
        response = error::render(&error, &id);
        let own: Vec<HeaderName> = response.headers().keys().cloned().collect();
        for (name, value) in &set {
            if !own.contains(name) {
                response.headers_mut().append(name, value.clone());
            }
        }
    }
    let headers = response.headers_mut();
    // Room for what follows at once, rather than growing the map on the way.
    headers.reserve(SECURITY_HEADERS.len() + 2);
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, value);
    }
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if let Some(age) = host.config().server.hsts_max_age
        && let Ok(value) =
            HeaderValue::from_str(&format!("max-age={}; includeSubDomains", age.as_secs()))
    {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, value);
    }
    response
}

/// The audit middleware's authentication of a provider call, handed to its handler so the
/// token is verified once, against the generation the request runs on.
#[derive(Clone)]
pub(crate) struct Authenticated {
    pub generation: Arc<crate::host::Generation>,
    pub identity: Result<providers_security::Identity, providers_core::ProviderError>,
}

/// The verified tenant and subject of a request, for its access-log line (set by the audit
/// layer once it has checked the token).
#[derive(Debug, Default)]
pub struct Caller(pub std::sync::OnceLock<(Arc<str>, Arc<str>)>);

/// Where a handler leaves what the audit record needs and only it knows.
#[derive(Debug, Default)]
pub struct AuditSlot {
    /// SHA-256 of the request payload, hex.
    pub payload: std::sync::OnceLock<String>,
}

/// Puts the verified tenant and subject (clipped, like everywhere it is logged) on the
/// request's span; nothing is copied when the span is disabled.
pub(super) fn record_caller(tenant: &str, subject: &str) {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        tracing::record_all!(span, tenant = tenant, subject = clip(subject, 256).as_str());
    }
}

pub(super) fn clip(s: &str, max: usize) -> String {
    clipped(s, max).to_owned()
}

/// The first `max` characters of `s`, borrowed.
fn clipped(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Records the request in the audit trail: every provider call and admin request, and any
/// other request refused for its credentials (401/403). In `fail_closed` mode (or with a
/// full buffer) provider calls are refused while the trail cannot be written.
async fn audit_requests(
    State(host): State<Arc<Host>>,
    mut request: Request,
    next: Next,
) -> Response {
    let audit = host.audit();
    let path = request.uri().path();
    // The token endpoints record their own (they know the client); the rest here are public.
    if !audit.enabled()
        || matches!(
            path,
            "/health" | "/ready" | "/openapi.json" | "/.well-known/jwks.json"
        )
        || path.starts_with("/auth/")
    {
        return next.run(request).await;
    }
    let started = Instant::now();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let call =
        request.method() == Method::POST && segments.len() == 3 && segments[0] == "providers";
    let admin = segments[0] == "admin";
    let (service, action) = if call {
        (clip(segments[1], 128), clip(segments[2], 128))
    } else if admin {
        let target = request.uri().path_and_query().map_or(path, |p| p.as_str());
        (
            String::new(),
            clip(&format!("{} {target}", request.method()), 256),
        )
    } else {
        (
            String::new(),
            clip(&format!("{} {path}", request.method()), 256),
        )
    };
    if call && let Some(why) = audit.refusal() {
        return ApiError::new(ErrorCode::ProviderUnavailable, why).into_response();
    }
    let generation = host.generation();
    let authenticated = generation.authenticate(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let identity = authenticated.as_ref().ok();
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.to_string())
        .unwrap_or_default();
    let slot = Arc::new(AuditSlot::default());
    request.extensions_mut().insert(slot.clone());
    let config = &generation.config;
    let (tenant, subject) = match identity {
        Some(id)
            if config.tenants.contains_key(&*id.tenant)
                || config.admin.platform_tenant.as_deref() == Some(&*id.tenant) =>
        {
            (id.tenant.to_string(), clip(&id.subject, 256))
        }
        Some(id) => (crate::audit::NO_TENANT.to_owned(), clip(&id.subject, 256)),
        None => (crate::audit::NO_TENANT.to_owned(), String::new()),
    };
    if let Some(caller) = request.extensions().get::<Arc<Caller>>() {
        // The token's own strings, shared; the access line clips the subject as it writes it.
        let _ = caller.0.set(identity.map_or_else(
            || (Arc::from(""), Arc::from("")),
            |i| (i.tenant.clone(), i.subject.clone()),
        ));
    }
    if let Some(id) = identity {
        record_caller(&id.tenant, &subject);
    }
    if call {
        // The token is checked once per request: the handler takes this result.
        request.extensions_mut().insert(Authenticated {
            generation: generation.clone(),
            identity: authenticated,
        });
    }
    let draft = crate::audit::Record {
        tenant,
        kind: if call { "call" } else { "admin" }.into(),
        subject,
        service,
        action,
        outcome: "error".into(),
        error_code: String::new(),
        request_id,
        latency_us: 0,
        payload_sha256: String::new(),
        note: "the client went away before the answer".into(),
        at_ms: 0,
    };
    // A client that goes away drops this future mid-call, perhaps after the provider did its
    // work: the guard still records the call (provider calls and admin requests only).
    let mut pending = Unanswered {
        host: host.clone(),
        record: Some(draft),
        armed: call || admin,
        started,
        slot: slot.clone(),
    };
    let response = next.run(request).await;
    let Some(draft) = pending.record.take() else {
        return response;
    };
    let status = response.status();
    let kind = match (call, admin) {
        (true, _) => "call",
        (_, true) => "admin",
        _ if status == StatusCode::UNAUTHORIZED => "authn",
        _ if status == StatusCode::FORBIDDEN => "authz",
        _ => return response,
    };
    let code = response
        .extensions()
        .get::<Arc<ApiError>>()
        .map(|e| e.error.code);
    // Rate-limit refusals are not recorded one by one: a flood must not become a flood of
    // records in the queue every tenant shares.
    if code == Some(ErrorCode::RateLimited) && status == StatusCode::TOO_MANY_REQUESTS {
        return response;
    }
    audit
        .record(crate::audit::Record {
            kind: kind.into(),
            outcome: match code {
                None if !status.is_success() => "error",
                code => crate::audit::outcome_of(code),
            }
            .into(),
            error_code: code.map(|c| c.as_str().to_owned()).unwrap_or_default(),
            latency_us: i64::try_from(started.elapsed().as_micros()).unwrap_or(i64::MAX),
            payload_sha256: slot.payload.get().cloned().unwrap_or_default(),
            note: String::new(),
            ..draft
        })
        .await;
    response
}

/// The record of a request whose answer was never produced, written when it is dropped.
struct Unanswered {
    host: Arc<Host>,
    record: Option<crate::audit::Record>,
    /// Whether an unanswered request is recorded (provider calls and admin requests).
    armed: bool,
    started: Instant,
    slot: Arc<AuditSlot>,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(mut record) = self.record.take().filter(|_| self.armed) else {
            return;
        };
        record.latency_us = i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX);
        record.payload_sha256 = self.slot.payload.get().cloned().unwrap_or_default();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let host = self.host.clone();
            runtime.spawn(async move { host.audit().record(record).await });
        }
    }
}

/// CORS from `[server.cors]`; none (no cross-origin access) when it is absent.
fn cors(config: Option<&CorsConfig>) -> Option<CorsLayer> {
    let config = config?;
    let origins = if config.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers(
                config
                    .allowed_headers
                    .iter()
                    .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                    .collect::<Vec<_>>(),
            )
            .expose_headers([HeaderName::from_static(REQUEST_ID), header::RETRY_AFTER])
            .max_age(config.max_age),
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::new(
        ErrorCode::Internal,
        "the host failed while handling this request",
    )
    .into_response()
}

/// The host's routes.
pub fn router(host: Arc<Host>) -> Router {
    let cors = cors(host.config().server.cors.as_ref());
    Router::new()
        .route("/providers", get(routes::list))
        .route("/providers/{service}", get(routes::describe))
        .route("/providers/{service}/{action}", post(routes::call))
        .route("/openapi.json", get(routes::openapi))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .route("/admin/providers", get(admin::providers))
        .route("/admin/audit", get(admin::audit))
        .route("/admin/instances", get(admin::instances))
        .route(
            "/admin/clients",
            get(admin::clients).post(admin::add_client),
        )
        .route(
            "/admin/clients/{client_id}/revoke",
            post(admin::revoke_client),
        )
        .route("/auth/token", post(auth::token))
        .route("/auth/refresh", post(auth::refresh))
        .route("/.well-known/jwks.json", get(auth::jwks))
        .route("/admin/config/validate", post(admin::validate))
        .route("/admin/config/reload", post(admin::reload))
        .route("/admin/plugins/reload", post(admin::reload))
        .route("/admin/providers/{service}/pause", post(admin::pause))
        .route("/admin/providers/{service}/resume", post(admin::resume))
        .route("/admin/providers/{service}/restart", post(admin::restart))
        .route(
            "/admin/tenants/{tenant}/services/{service}/enable",
            post(admin::enable),
        )
        .route(
            "/admin/tenants/{tenant}/services/{service}/disable",
            post(admin::disable),
        )
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(host.clone(), audit_requests))
        .layer(option_layer(cors))
        .layer(middleware::from_fn_with_state(
            host.clone(),
            request_context,
        ))
        .with_state(host)
}

/// Serves `host` on `listener` until `shutdown` resolves. Then it stops accepting, closes
/// idle connections, lets requests in flight finish within the shutdown grace, cancels the
/// ones that do not, and only then disconnects every instance and closes storage.
pub async fn serve(
    host: Arc<Host>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut sweeper = {
        let host = host.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(host.eviction_period());
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => { host.maintain().await; }
                    _ = stop_rx.changed() => break,
                }
            }
        })
    };
    let mut connections = serve::Connections::new(ConnectionLimits::of(&host.config().server));
    // `/ready` turns 503 first; the listener stays open for `server.shutdown_delay`, so a
    // load balancer that polls it stops sending before any connection is refused.
    let stop = {
        let host = host.clone();
        async move {
            shutdown.await;
            host.begin_draining();
            if let Some(delay) = host.config().server.shutdown_delay {
                tracing::info!(
                    delay = %humantime::format_duration(delay),
                    "shutdown requested; /ready answers 503 while requests are still served"
                );
                tokio::time::sleep(delay).await;
            }
        }
    };
    connections
        .accept(&listener, &router(host.clone()), stop)
        .await;
    drop(listener);
    tracing::info!("shutdown requested; finishing in-flight requests");
    let deadline = Instant::now() + host.config().server.shutdown_grace;
    let open = connections.finish(deadline).await;
    if open > 0 {
        tracing::warn!(
            connections = open,
            "requests still running after the shutdown grace are cancelled"
        );
        // Dropping a connection drops the call it serves; calls running elsewhere (a connect)
        // are cancelled by the instances' own drain.
        connections.abort().await;
    }
    // The sweeper stops between sweeps, never halfway through a disconnect, unless a sweep
    // outlasts the grace.
    let _ = stop_tx.send(true);
    if tokio::time::timeout_at(deadline.into(), &mut sweeper)
        .await
        .is_err()
    {
        sweeper.abort();
    }
    host.shutdown(deadline).await;
    Ok(())
}
