//! HTTP: the router, the request-id middleware and serving with graceful shutdown.

mod admin;
mod error;
pub mod openapi;
mod routes;
mod serve;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use providers_core::ErrorCode;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

pub use error::{ApiError, status_of};
pub use serve::ConnectionLimits;

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

async fn request_context(mut request: Request, next: Next) -> Response {
    let id: Arc<str> = match request.headers().get(REQUEST_ID).and_then(acceptable_id) {
        Some(id) => Arc::from(id),
        None => Arc::from(uuid::Uuid::new_v4().to_string()),
    };
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Some(error) = response.extensions_mut().remove::<Arc<ApiError>>() {
        response = error::render(&error, &id);
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
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
    Router::new()
        .route("/providers", get(routes::list))
        .route("/providers/{service}", get(routes::describe))
        .route("/providers/{service}/{action}", post(routes::call))
        .route("/openapi.json", get(routes::openapi))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/admin/providers", get(admin::providers))
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
        .layer(TraceLayer::new_for_http())
        .layer(middleware::from_fn(request_context))
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
