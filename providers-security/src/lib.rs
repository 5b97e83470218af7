//! Security for the ERP Provider Layer: bearer-token verification and issuing, client
//! credentials (Argon2id), roles and permissions, secret references in configuration and the
//! sealing of stored secrets (XChaCha20-Poly1305).
//!
//! The host depends on it; providers do not (they receive the verified tenant, subject and
//! roles in their call context). It depends on no other workspace crate and runs no runtime.

mod credentials;
mod permissions;
mod secrets;
mod token;
mod vault;

pub use credentials::{HashSettings, SecretHasher, random_token};
pub use permissions::Permissions;
pub use secrets::{Reference, find_references, resolve_references};
pub use token::{
    Algorithm, DEFAULT_MAX_TOKEN_BYTES, Identity, KeyMaterial, MAX_LEEWAY_SECONDS, TokenIssuer,
    TokenSettings, TokenVerifier,
};
pub use vault::{Keyring, MasterKey, Sealed, Secret};

/// Everything this crate can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecurityError {
    /// A token was missing, malformed, forged, expired or for someone else. The text is safe to show.
    #[error("{0}")]
    Unauthenticated(String),
    /// A key could not be used, with which key and why.
    #[error("key {key}: {reason}")]
    BadKey {
        /// The key's id or position.
        key: String,
        /// Why it was refused.
        reason: String,
    },
    /// A setting is out of its range, with which setting and why.
    #[error("{setting}: {reason}")]
    BadSetting {
        /// The setting, as written in the configuration.
        setting: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A `${scheme:NAME}` reference could not be resolved.
    #[error("{0}")]
    Reference(String),
}
