//! Client credentials of the token service: secrets kept only as Argon2id hashes, and the
//! random tokens (client secrets, refresh tokens) handed out once.

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, Params, Version};
use base64::Engine;
use serde::Deserialize;

use crate::SecurityError;

/// Argon2id cost parameters (`[auth] argon2`). The defaults are OWASP's first recommended
/// set: 19 MiB, two passes, one lane — about 20 ms of one core per hash on a current server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashSettings {
    /// Memory per hash, KiB (at least 8 × parallelism).
    pub memory_kib: u32,
    /// Passes over the memory (at least 1).
    pub iterations: u32,
    /// Lanes (at least 1).
    pub parallelism: u32,
}

impl Default for HashSettings {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// Hashes and checks client secrets with Argon2id.
#[derive(Clone)]
pub struct SecretHasher {
    argon: Argon2<'static>,
    /// A hash of nothing anyone knows, checked for unknown clients so that an unknown id
    /// costs what a known one does (no timing oracle for which ids exist).
    decoy: String,
}

impl std::fmt::Debug for SecretHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretHasher")
            .field("params", self.argon.params())
            .finish_non_exhaustive()
    }
}

impl SecretHasher {
    /// A hasher with `settings`; refuses parameters Argon2 does not accept, naming which.
    pub fn new(settings: HashSettings) -> Result<Self, SecurityError> {
        let params = Params::new(
            settings.memory_kib,
            settings.iterations,
            settings.parallelism,
            None,
        )
        .map_err(|e| SecurityError::BadSetting {
            setting: "auth.argon2",
            reason: format!(
                "{e} (memory_kib = {}, iterations = {}, parallelism = {})",
                settings.memory_kib, settings.iterations, settings.parallelism
            ),
        })?;
        let argon = Argon2::new(argon2::Algorithm::Argon2id, Version::V0x13, params);
        let mut hasher = Self {
            argon,
            decoy: String::new(),
        };
        hasher.decoy = hasher.hash(&random_token(32))?;
        Ok(hasher)
    }

    /// The PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) of `secret`, with a fresh salt.
    pub fn hash(&self, secret: &str) -> Result<String, SecurityError> {
        let salt = SaltString::generate(&mut OsRng);
        self.argon
            .hash_password(secret.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| SecurityError::BadSetting {
                setting: "auth.argon2",
                reason: format!("hashing failed: {e}"),
            })
    }

    /// Whether `secret` matches `stored` (a PHC string, verified under the parameters it
    /// was made with, so raising the costs does not lock existing clients out). `None`
    /// checks against the decoy and is always false, at the same cost.
    pub fn verify(&self, stored: Option<&str>, secret: &str) -> bool {
        let (phc, real) = match stored {
            Some(s) => (s, true),
            None => (self.decoy.as_str(), false),
        };
        let Ok(parsed) = PasswordHash::new(phc) else {
            return false;
        };
        self.argon
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok()
            && real
    }
}

/// `bytes` random bytes from the operating system, base64url without padding: client
/// secrets, refresh tokens and client ids.
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> SecretHasher {
        SecretHasher::new(HashSettings {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap()
    }

    #[test]
    fn hashes_verify_only_their_secret() {
        let h = cheap();
        let stored = h.hash("s3cret").unwrap();
        assert!(
            stored.starts_with("$argon2id$v=19$m=64,t=1,p=1$"),
            "{stored}"
        );
        assert!(h.verify(Some(&stored), "s3cret"));
        assert!(!h.verify(Some(&stored), "s3cre"));
        assert!(!h.verify(None, "s3cret"));
        assert!(!h.verify(Some("not a hash"), "s3cret"));
        assert_ne!(stored, h.hash("s3cret").unwrap(), "fresh salt each time");
    }

    #[test]
    fn a_hash_made_under_other_costs_still_verifies() {
        let old = cheap().hash("s").unwrap();
        let stronger = SecretHasher::new(HashSettings {
            memory_kib: 128,
            iterations: 2,
            parallelism: 1,
        })
        .unwrap();
        assert!(stronger.verify(Some(&old), "s"));
    }

    #[test]
    fn bad_parameters_are_named() {
        let e = SecretHasher::new(HashSettings {
            memory_kib: 1,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("auth.argon2: "), "{e}");
        assert!(e.to_string().contains("memory_kib = 1"), "{e}");
    }

    #[test]
    fn random_tokens_are_url_safe_and_distinct() {
        let a = random_token(32);
        assert_eq!(a.len(), 43);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(a, random_token(32));
    }
}
