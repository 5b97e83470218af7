//! The one error that crosses the provider boundary, with its stable code.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Stable error codes. Clients match on these; each has exactly one HTTP status in the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request or payload is malformed or breaks a schema or a limit.
    ValidationError,
    /// No valid credentials.
    Unauthenticated,
    /// Valid credentials, but not allowed.
    Forbidden,
    /// The service, action or resource does not exist (for this tenant).
    NotFound,
    /// A precondition failed, such as a stale ETag.
    Conflict,
    /// A rate or concurrency limit was hit.
    RateLimited,
    /// The call ran past its deadline.
    Timeout,
    /// The provider could not be brought up or is paused.
    ProviderUnavailable,
    /// The provider failed: an error it reported as its own, a panic, a trap.
    ProviderError,
    /// A fault of the host itself.
    Internal,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::ValidationError,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::RateLimited,
        ErrorCode::Timeout,
        ErrorCode::ProviderUnavailable,
        ErrorCode::ProviderError,
        ErrorCode::Internal,
    ];

    /// The wire form, e.g. `"VALIDATION_ERROR"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ValidationError => "VALIDATION_ERROR",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::ProviderUnavailable => "PROVIDER_UNAVAILABLE",
            ErrorCode::ProviderError => "PROVIDER_ERROR",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error returned by a provider call (or by the host on the provider's behalf).
///
/// This is a value rather than an enum of causes because it travels across every loader
/// (builtin, native FFI, wasm) and onto the wire: a code and a human-readable detail.
/// The detail is shown to the client, so it must not carry secrets or internals.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{code}: {detail}")]
pub struct ProviderError {
    /// The stable code.
    pub code: ErrorCode,
    /// What went wrong, for a human; names the offending field or value where there is one.
    pub detail: String,
}

impl ProviderError {
    /// An error with any code.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }

    /// `VALIDATION_ERROR`.
    pub fn validation(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::ValidationError, detail)
    }

    /// `NOT_FOUND`.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, detail)
    }

    /// `CONFLICT`.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, detail)
    }

    /// `FORBIDDEN`.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, detail)
    }

    /// `PROVIDER_UNAVAILABLE`.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::ProviderUnavailable, detail)
    }

    /// `PROVIDER_ERROR`: the provider's own failure.
    pub fn provider(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::ProviderError, detail)
    }

    /// `INTERNAL`.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, detail)
    }
}
