//! Sealing of stored secrets: XChaCha20-Poly1305 under a master key, each value stored with
//! the id of the key that sealed it so keys rotate without a flag day.
//!
//! The nonce is 24 random bytes (XChaCha's size makes random nonces safe for any number of
//! values), and the secret's name is the associated data: a sealed value copied under
//! another name does not open.

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

use crate::SecurityError;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A secret's value: shown as `<redacted>` by `Debug` and `Display`, so that no log line or
/// error message that formats it can leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A 256-bit master key and its id.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// One sealed value, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The id of the key that sealed it.
    pub key_id: String,
    /// The nonce, base64.
    pub nonce: String,
    /// Ciphertext and tag, base64.
    pub ciphertext: String,
}

impl MasterKey {
    /// A key from its text: 32 bytes in base64 (what [`MasterKey::generate`] prints), with
    /// surrounding whitespace ignored. `source` names where it came from in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, SecurityError> {
        let bad = |reason: String| SecurityError::BadKey {
            key: source.to_owned(),
            reason,
        };
        let bytes = B64.decode(text.trim()).map_err(|_| {
            bad(
                "a master key is 32 bytes in base64 (provider-host secrets keygen prints one)"
                    .into(),
            )
        })?;
        if bytes.len() != 32 {
            return Err(bad(format!(
                "a master key is 32 bytes; this one is {} (provider-host secrets keygen prints one)",
                bytes.len()
            )));
        }
        let digest =
            Sha256::digest([b"erp-provider-layer master key\0".as_slice(), &bytes].concat());
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        let cipher = XChaCha20Poly1305::new_from_slice(&bytes)
            .map_err(|_| bad("not a 256-bit key".into()))?;
        Ok(Self { id, cipher })
    }

    /// A new random key, in the text form [`MasterKey::parse`] reads.
    pub fn generate() -> String {
        B64.encode(XChaCha20Poly1305::generate_key(&mut OsRng))
    }

    /// The key's id: 8 hex digits derived from the key (not secret, not reversible).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `value` as the secret `name`.
    pub fn seal(&self, name: &str, value: &Secret) -> Result<Sealed, SecurityError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: value.expose().as_bytes(),
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SecurityError::Reference(format!("secret '{name}': sealing failed")))?;
        Ok(Sealed {
            key_id: self.id.clone(),
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(ciphertext),
        })
    }
}

/// The current key, which seals, and earlier ones, which still open what they sealed.
#[derive(Debug, Clone)]
pub struct Keyring {
    /// Seals new values and opens its own.
    pub current: MasterKey,
    /// Open values sealed before a rotation.
    pub previous: Vec<MasterKey>,
}

impl Keyring {
    /// Opens the secret `name` with whichever key sealed it.
    pub fn open(&self, name: &str, sealed: &Sealed) -> Result<Secret, SecurityError> {
        let fail = |why: &str| SecurityError::Reference(format!("secret '{name}': {why}"));
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == sealed.key_id)
            .ok_or_else(|| {
                fail(&format!(
                    "sealed with key {}, which is not configured (keys: {})",
                    sealed.key_id,
                    std::iter::once(&self.current)
                        .chain(&self.previous)
                        .map(|k| k.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let nonce: [u8; 24] = B64
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| fail("stored nonce is damaged"))?;
        let ciphertext = B64
            .decode(&sealed.ciphertext)
            .map_err(|_| fail("stored value is damaged"))?;
        let plain = key
            .cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &ciphertext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| fail("stored value does not open with its key (altered, or stored under another name)"))?;
        String::from_utf8(plain)
            .map(Secret)
            .map_err(|_| fail("stored value is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::parse(&MasterKey::generate(), "test").unwrap()
    }

    #[test]
    fn sealed_values_open_under_their_name_and_key_only() {
        let (a, b) = (key(), key());
        assert_ne!(a.id(), b.id());
        let sealed = a.seal("db_password", &Secret::new("hunter2")).unwrap();
        assert_eq!(sealed.key_id, a.id());
        assert!(!sealed.ciphertext.contains("hunter2"));
        let ring = Keyring {
            current: b.clone(),
            previous: vec![a.clone()],
        };
        assert_eq!(
            ring.open("db_password", &sealed).unwrap().expose(),
            "hunter2"
        );
        let e = ring.open("other", &sealed).unwrap_err().to_string();
        assert!(e.contains("does not open"), "{e}");
        let only_b = Keyring {
            current: b,
            previous: vec![],
        };
        let e = only_b.open("db_password", &sealed).unwrap_err().to_string();
        assert!(e.contains(&format!("sealed with key {}", a.id())), "{e}");
        let mut bytes = B64.decode(&sealed.ciphertext).unwrap();
        bytes[0] ^= 1;
        let altered = Sealed {
            ciphertext: B64.encode(bytes),
            ..sealed
        };
        let ring = Keyring {
            current: a,
            previous: vec![],
        };
        let e = ring.open("db_password", &altered).unwrap_err().to_string();
        assert!(e.contains("does not open"), "{e}");
    }

    #[test]
    fn keys_parse_from_base64_and_say_what_is_wrong() {
        let text = MasterKey::generate();
        assert_eq!(
            MasterKey::parse(&format!(" {text}\n"), "f").unwrap().id(),
            MasterKey::parse(&text, "f").unwrap().id()
        );
        let e = MasterKey::parse("c2hvcnQ=", "keys.txt")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "key keys.txt: a master key is 32 bytes; this one is 5 (provider-host secrets keygen prints one)"
        );
        assert!(MasterKey::parse("not base64!", "k").is_err());
    }

    #[test]
    fn secrets_never_format_their_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(<redacted>) <redacted>");
        assert!(!format!("{:?}", key()).contains('='));
    }
}
