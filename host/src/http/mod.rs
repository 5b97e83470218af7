//! HTTP: the router, the request-id middleware and serving with graceful shutdown.

mod error;
pub mod openapi;
mod routes;

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
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
        .layer(middleware::from_fn(request_context))
        .with_state(host)
}

/// Serves `host` on `listener` until `shutdown` resolves; then lets in-flight requests
/// finish and disconnects every instance, all within one shutdown grace.
pub async fn serve(
    host: Arc<Host>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sweeper = {
        let host = host.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(host.eviction_period());
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => { host.evict_idle().await; }
                    _ = stop.changed() => break,
                }
            }
        })
    };
    let grace = host.config().server.shutdown_grace;
    let mut stopped = stop_rx.clone();
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let server = axum::serve(listener, router(host.clone())).with_graceful_shutdown(signal);
    let (result, deadline) = {
        let mut server = std::pin::pin!(server.into_future());
        tokio::select! {
            result = &mut server => (result, Instant::now() + grace),
            _ = stopped.changed() => {
                // One grace for everything: open requests first, then the instances' drain.
                let deadline = Instant::now() + grace;
                match tokio::time::timeout_at(deadline.into(), &mut server).await {
                    Ok(result) => (result, deadline),
                    Err(_) => {
                        // Their connection tasks are not cancelled; their instances are disconnected next.
                    tracing::warn!("requests still open after the shutdown grace are abandoned");
                        (Ok(()), deadline)
                    }
                }
            }
        }
        // The server future, and with it the stop sender, is dropped here.
    };
    // The sweeper stops between sweeps, never halfway through a disconnect, unless a sweep
    // outlasts the grace.
    let mut sweeper = sweeper;
    if tokio::time::timeout_at(deadline.into(), &mut sweeper)
        .await
        .is_err()
    {
        sweeper.abort();
    }
    host.shutdown(deadline).await;
    result
}
