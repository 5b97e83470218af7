//! The one place where errors become HTTP responses.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use providers_core::{ErrorCode, ProviderError};
use serde_json::json;

/// An error on its way to the client. It travels as a response extension and is written
/// out by [`super::request_context`], which knows the request id.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The error.
    pub error: ProviderError,
    /// A status other than the code's own (413 for an oversized body).
    pub status: Option<StatusCode>,
}

impl ApiError {
    /// With the code's own status.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        ProviderError::new(code, detail).into()
    }
}

impl From<ProviderError> for ApiError {
    fn from(error: ProviderError) -> Self {
        Self {
            error,
            status: None,
        }
    }
}

/// The HTTP status of each stable code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::ValidationError => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::ProviderUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ProviderError => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| status_of(self.error.code));
        let mut response = status.into_response();
        response.extensions_mut().insert(Arc::new(self));
        response
    }
}

/// Writes `error` in the one error shape.
pub fn render(error: &ApiError, request_id: &str) -> Response {
    let status = error.status.unwrap_or_else(|| status_of(error.error.code));
    if status.is_server_error() {
        tracing::warn!(request_id, code = %error.error.code, detail = %error.error.detail, "request failed");
    } else if matches!(
        error.error.code,
        ErrorCode::Unauthenticated | ErrorCode::Forbidden
    ) {
        // Refusals leave a trail for operators until the audit log exists.
        tracing::warn!(target: "provider_host::refused", request_id, code = %error.error.code, detail = %error.error.detail, "request refused");
    }
    let body = json!({
        "error_code": error.error.code.as_str(),
        "detail": error.error.detail,
        "request_id": request_id,
        "timestamp": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    });
    (status, Json(body)).into_response()
}
