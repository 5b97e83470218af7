//! The one place where errors become HTTP responses.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Seconds for a `Retry-After` header (a rate limit).
    pub retry_after: Option<u64>,
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
            retry_after: None,
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

/// Refusals (401/403) logged per second at most; the rest are counted and summed up in the
/// next second's first line, so a flood of bad tokens cannot flood the log.
const REFUSALS_LOGGED_PER_SECOND: u64 = 10;

/// Counts lines per one-second window; what is over the budget is counted, not logged.
struct Sampler {
    window: AtomicU64,
    in_window: AtomicU64,
    unlogged: AtomicU64,
}

/// Server-side failures logged per second at most: a storm of them (a probe hammering a
/// not-ready replica, a provider down under load) is summed up rather than written out.
const FAILURES_LOGGED_PER_SECOND: u64 = 50;

static REFUSALS: Sampler = Sampler::new();
static FAILURES: Sampler = Sampler::new();

impl Sampler {
    const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// Whether a line at `second` may be logged, and how many went unlogged before it.
    fn sample(&self, second: u64, budget: u64) -> (bool, u64) {
        if self.window.swap(second, Ordering::AcqRel) != second {
            self.in_window.store(0, Ordering::Release);
        }
        if self.in_window.fetch_add(1, Ordering::AcqRel) < budget {
            (true, self.unlogged.swap(0, Ordering::AcqRel))
        } else {
            self.unlogged.fetch_add(1, Ordering::AcqRel);
            (false, 0)
        }
    }
}

fn sample(sampler: &Sampler, budget: u64) -> (bool, u64) {
    let second = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    sampler.sample(second, budget)
}

/// Writes `error` in the one error shape.
///
/// Details can carry client-supplied text (a tenant or role from a token), so they are
/// logged with `?`: quoted and escaped, a newline in them cannot forge a log line.
pub fn render(error: &ApiError, request_id: &str) -> Response {
    let status = error.status.unwrap_or_else(|| status_of(error.error.code));
    if status.is_server_error() {
        let (log, unlogged) = sample(&FAILURES, FAILURES_LOGGED_PER_SECOND);
        if log {
            tracing::warn!(request_id, code = %error.error.code, detail = ?error.error.detail, unlogged_before = unlogged, "request failed");
        }
    } else if matches!(
        error.error.code,
        ErrorCode::Unauthenticated | ErrorCode::Forbidden
    ) {
        // Refusals leave a trail for operators until the audit log exists.
        let (log, unlogged) = sample(&REFUSALS, REFUSALS_LOGGED_PER_SECOND);
        if log {
            tracing::warn!(target: "provider_host::refused", request_id, code = %error.error.code, detail = ?error.error.detail, unlogged_before = unlogged, "request refused");
        }
    }
    let body = json!({
        "error_code": error.error.code.as_str(),
        "detail": error.error.detail,
        "request_id": request_id,
        "timestamp": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    });
    let mut response = (status, Json(body)).into_response();
    if let Some(secs) = error.retry_after {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, secs.into());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_lines_are_sampled_per_second_and_the_rest_counted() {
        let sampler = Sampler::new();
        let logged = (0..25).filter(|_| sampler.sample(7, 10).0).count();
        assert_eq!(logged, 10);
        assert_eq!(
            sampler.sample(8, 10),
            (true, 15),
            "the next second says how many went unlogged"
        );
        assert_eq!(sampler.sample(8, 10), (true, 0));
    }

    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn client_text_cannot_forge_log_lines() {
        let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = {
            let buffer = buffer.clone();
            move || Captured(buffer.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for code in [ErrorCode::Forbidden, ErrorCode::ProviderUnavailable] {
                let error = ApiError::new(code, "tenant \"evil\nWARN forged: admin logged in\"");
                render(&error, "req-1");
            }
        });
        let text =
            String::from_utf8_lossy(&buffer.lock().unwrap_or_else(|p| p.into_inner())).to_string();
        assert_eq!(text.lines().count(), 2, "one line per error: {text}");
        assert!(
            !text.lines().any(|l| l.starts_with("WARN forged")),
            "no line begins with client text: {text}"
        );
        assert!(
            text.contains(r#"\nWARN forged"#),
            "escaped in place: {text}"
        );
    }
}
